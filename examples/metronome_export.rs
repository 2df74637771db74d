//! Measures the Metronome export against the test suite's Metronome stand-in (a local server
//! that follows Metronome's documented ingest rules): usage events per second at a call rate,
//! and events per call.
//!
//! ```text
//! cargo run --release --example metronome_export --features metronome -- [tenants] [calls_per_second]
//! ```
//!
//! It records three hours of usage for `tenants` tenants (default 1,000) on two `sum` meters in
//! 15-minute windows (24 aggregates per tenant), then exports them with
//! `export.calls_per_second` (default 25, the configuration's default) and prints the events
//! sent per second, the calls made and the events per call. The store is the memory store, so
//! the figures are the exporter's and the pacing's, not a store's or Metronome's latency.

#[path = "../tests/common/metronome.rs"]
mod standin;

use std::{sync::Arc, time::Instant};

use tollgate::store::prelude::*;
use tollgate::{
    billing::{MetronomeSink, Secret},
    clock::Clock,
    store::{FlushId, MemoryStore, UsageBatch, UsageRecord},
    Config, Tollgate,
};

/// 2026-03-14T12:00:00Z
const NOON: i64 = 1_773_489_600;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let tenants: usize = args.next().map_or(1000, |a| a.parse().expect("tenants"));
    let rate: u32 = args.next().map_or(25, |a| a.parse().expect("calls per second"));
    let standin = standin::StandIn::start().await;
    let mut toml = format!(
        "[usage]\nwindow = \"15m\"\nflush_interval = \"10s\"\n\
         [export]\nsink = \"metronome\"\ncalls_per_second = {rate}\n\
         [meters.requests]\nevent_name = \"api_requests\"\n\
         [meters.tokens]\nevent_name = \"llm_tokens\"\n[plans.p]\n\
         [metronome]\napi_base = \"{}\"\n",
        standin.url
    );
    for t in 0..tenants {
        toml.push_str(&format!("[tenants.t{t}]\nplan = \"p\"\nmetronome_customer = \"acct-{t}\"\n"));
    }
    let config = Config::from_toml_str(&toml).expect("configuration");
    let store = Arc::new(MemoryStore::new());
    let now = NOON + 3 * 3600 + 301;
    let (clock, _fake) = Clock::fake_at_unix(now);
    standin.set_now(now);
    let sink = MetronomeSink::new(&Secret::new(standin::TOKEN), Some(&standin.url), std::time::Duration::from_secs(30))
        .expect("client");
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).clock(clock).billing_sink(sink).build();

    let mut records = Vec::new();
    for t in 0..tenants {
        for q in 0..12 {
            let window = NOON + q * 900;
            records.push(UsageRecord::new(format!("t{t}").as_str().into(), "requests".into(), window, 10));
            records.push(UsageRecord::new(format!("t{t}").as_str().into(), "tokens".into(), window, 1000));
        }
    }
    let aggregates = records.len();
    store.commit_usage(&UsageBatch::new(FlushId::new("usage"), records)).await.expect("commit");

    let started = Instant::now();
    let report = engine.export().await.expect("export");
    let elapsed = started.elapsed();
    let calls = standin.calls();
    println!("tenants: {tenants}, aggregates: {aggregates}, export.calls_per_second: {rate}");
    println!(
        "{} usage events in {:.2} s = {:.0} events/s, {calls} calls = {:.1} events per call",
        report.events,
        elapsed.as_secs_f64(),
        report.events as f64 / elapsed.as_secs_f64(),
        report.events as f64 / calls.max(1) as f64
    );
    let billed: i64 = standin.totals().values().sum();
    println!("billed in the stand-in: {billed} units, {} duplicates", standin.duplicates());
    assert_eq!(report.events, aggregates, "every aggregate exported once");
}
