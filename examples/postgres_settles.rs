//! How many `Idempotency-Key` completions PostgreSQL settles per second when many run at once:
//! the measurement of docs/performance.md ("Stored responses on PostgreSQL"). Each task claims a
//! fresh key and settles it completed with a 1 KB response, over and over, for the run's
//! seconds; the count of settles is divided by the time. Each completion adds the response's
//! bytes to the store's bound on stored responses: one row per window before, one of sixteen
//! shards now, so concurrent completions no longer queue on one row.
//!
//! The figure depends on the server and the machine (loopback, one machine); compare runs on
//! the same server. Run with a server (scripts/postgres-server.sh starts one):
//! `TOLLGATE_POSTGRES_URL=postgres://… cargo run --release --features postgres
//!  --example postgres_settles -- <tasks> <seconds>`

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tollgate::store::{
    CompletedRequest, IdempotencyClaim, IdempotencySettle, IdempotencyState, IdempotencyStore, PostgresOptions,
    PostgresStore, StoredResponse,
};

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let (tasks, seconds) = match args[..] {
        [t, s] => (t, s),
        _ => (32, 10),
    };
    let url = std::env::var("TOLLGATE_POSTGRES_URL").expect("TOLLGATE_POSTGRES_URL");
    let schema = format!("settles_{}", std::process::id());
    let options = PostgresOptions::new(url).schema(schema).pool_size(tasks as usize);
    let store = Arc::new(PostgresStore::open(&options).await.unwrap());
    let response = Arc::new(StoredResponse::new(200, vec![], Bytes::from(vec![b'x'; 1024]), None));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let stop = Arc::new(AtomicBool::new(false));
    let settled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (store, response, stop, settled) = (store.clone(), response.clone(), stop.clone(), settled.clone());
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let owner = task << 32 | n;
                let key = format!("k{task}-{n}");
                let claim = IdempotencyClaim::new(key.as_str(), "r", owner, now, now + 300, now + 86_400);
                assert_eq!(store.claim_idempotency(&claim).await.unwrap(), IdempotencyState::Claimed);
                // A bound far above what the run stores: every completion is taken.
                let done = CompletedRequest::new(response.clone(), now, 86_400, 1 << 40);
                store.settle_idempotency(&key, owner, &IdempotencySettle::Completed(done)).await.unwrap();
                settled.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = settled.load(Ordering::Relaxed);
    println!("{tasks} tasks, {seconds} s: {n} claims settled completed, {:.0} per second", n as f64 / elapsed);
}
