//! Holds, in one criterion run: a request on a route whose configuration holds tokens
//! (`[[routes]] hold`) against the same route without the hold, and a handler's hold, record
//! and settle against a plain record (`TenantContext::record`). One tenant, warm state, a
//! lease no run exhausts, the worker running.
//!
//! Run with: `cargo bench --bench holds`. Read a hold's cost as the difference between two
//! cases of the same run (criterion's times are only comparable within one run).

use std::{sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::{
    door::{Admission, Credential, RequestInfo},
    store::{prelude::*, KeyHash, MemoryStore, TenantRecord},
    Config, Overrun, Tollgate,
};
use tower::{Layer, Service};

#[path = "support/mod.rs"]
mod support;

use support::*;

/// One tenant whose tokens quota no run exhausts; `/` reports tokens, with a hold of 10 when
/// `hold`.
fn engine(hold: bool, rt: &tokio::runtime::Runtime) -> Tollgate {
    let config = Config::from_toml_str(&format!(
        r#"
        [usage]
        flush_interval = "30m"
        [limits]
        directory_ttl = "2h"
        [meters.tokens]
        [plans.bench]
        rate = "1000000000/s"
        quotas.tokens = {{ limit = 1000000000000, period = "month", mode = "hard", lease = 1000000000 }}
        [[routes]]
        path = "/"
        reports = ["tokens"]
        {}
        "#,
        if hold { "hold.tokens = 10" } else { "" }
    ))
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    rt.block_on(async {
        let record = TenantRecord::new("t0".into(), "bench".into());
        store.put_tenant(&record, &[KeyHash::of(key(0).as_bytes())]).await.unwrap();
    });
    let (engine, worker) = Tollgate::builder(config).store_arc(store).build();
    rt.spawn(worker.run());
    engine
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut group = c.benchmark_group("holds");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    let keys = Arc::new(vec![key(0)]);
    let mut kept = Vec::new();
    for (name, hold) in [("route_without_hold", false), ("route_with_hold", true)] {
        let engine = engine(hold, &rt);
        let mut svc = tollgate::TollgateLayer::new(engine.clone()).layer(bare());
        // Warm: the tenant known, its lease reserved.
        rt.block_on(async {
            for _ in 0..3 {
                assert_eq!(svc.call(request(&key(0))).await.unwrap().status(), 200);
            }
        });
        group.bench_function(name, |b| b.iter_custom(|iters| run(&svc, &keys, 1, iters, rt.handle())));
        kept.push(engine);
    }
    // A handler's view: admitted, then a record, or a hold with its record and settle.
    let engine = engine(false, &rt);
    let key0 = key(0);
    let admit = |engine: &Tollgate| {
        let info = RequestInfo::new("POST", "/", Credential::ApiKey(key0.as_bytes()));
        match engine.admit(&info) {
            Admission::Admitted(ticket) => ticket,
            Admission::Pending(p) => rt.block_on(engine.resolve(p)).unwrap(),
            Admission::Rejected(r) => panic!("{r}"),
        }
    };
    assert!(admit(&engine).complete(200));
    group.bench_function("handler_record", |b| {
        b.iter(|| {
            let ticket = admit(&engine);
            ticket.context().record("tokens", 5).unwrap();
            ticket.complete(200)
        })
    });
    group.bench_function("handler_hold_settle", |b| {
        let _enter = rt.enter();
        b.iter(|| {
            let ticket = admit(&engine);
            let ctx = ticket.context();
            let mut hold = now(ctx.hold_with("tokens", 10, Overrun::Refuse)).unwrap();
            hold.record(5).unwrap();
            hold.settle();
            ticket.complete(200)
        })
    });
    group.finish();
    for engine in kept.into_iter().chain([engine]) {
        rt.block_on(engine.shutdown()).unwrap();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
