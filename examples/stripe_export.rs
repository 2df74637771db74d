//! Measures the Stripe export against the test suite's Stripe stand-in (a local server that
//! follows Stripe's rules): meter events per second at a call rate, and Stripe calls per
//! tenant-meter-hour.
//!
//! ```text
//! cargo run --release --example stripe_export --features stripe -- [tenants] [calls_per_second]
//! ```
//!
//! It records three hours of usage for `tenants` tenants (default 500) on two meters (a `sum`
//! meter and one pre-aggregated per hour), in 15-minute windows, with a late flush for a tenth
//! of them after the first export; then exports with `export.calls_per_second` (default 25,
//! the configuration's default) and prints the rate reached and the calls per
//! tenant-meter-hour. Then it reconciles the three hours (two hours later, so they have
//! settled) and prints the reads of Stripe and the time of the pass.

#[path = "../tests/common/stripe.rs"]
mod standin;

use std::{sync::Arc, time::Instant};

use tollgate::store::prelude::*;
use tollgate::{
    billing::{Secret, StripeSink},
    clock::Clock,
    store::{FlushId, MemoryStore, UsageBatch, UsageRecord},
    Config, Tollgate,
};

/// 2026-03-14T12:00:00Z
const NOON: i64 = 1_773_489_600;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let tenants: usize = args.next().map_or(500, |a| a.parse().expect("tenants"));
    let rate: u32 = args.next().map_or(25, |a| a.parse().expect("calls per second"));
    let standin = standin::StandIn::start(&[("api_requests", None), ("llm_tokens", Some(3600))]).await;
    let mut toml = format!(
        "[usage]\nwindow = \"15m\"\nflush_interval = \"10s\"\n[export]\ncalls_per_second = {rate}\n\
         [meters.requests]\nevent_name = \"api_requests\"\n\
         [meters.tokens]\nevent_name = \"llm_tokens\"\naggregation = \"hour\"\n[plans.p]\n\
         [stripe]\napi_base = \"{}\"\n",
        standin.url
    );
    for t in 0..tenants {
        toml.push_str(&format!("[tenants.t{t}]\nplan = \"p\"\nstripe_customer = \"cus_{t}\"\n"));
    }
    let config = Config::from_toml_str(&toml).expect("configuration");
    let store = Arc::new(MemoryStore::new());
    let (clock, fake) = Clock::fake_at_unix(NOON + 3 * 3600 + 301);
    standin.set_now(NOON + 3 * 3600 + 301);
    let sink = StripeSink::new(&Secret::new(standin::SECRET), Some(&standin.url), std::time::Duration::from_secs(30))
        .expect("client");
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).clock(clock).billing_sink(sink).build();

    // Three hours of usage: every 15-minute window for requests (a sum meter, one aggregate per
    // window) and tokens (pre-aggregated per hour: one aggregate per hour).
    let mut records = Vec::new();
    for t in 0..tenants {
        for q in 0..12 {
            let window = NOON + q * 900;
            records.push(UsageRecord::new(format!("t{t}").as_str().into(), "requests".into(), window, 10));
            if q % 4 == 0 {
                records.push(UsageRecord::new(format!("t{t}").as_str().into(), "tokens".into(), window, 1000));
            }
        }
    }
    store.commit_usage(&UsageBatch::new(FlushId::new("usage"), records)).await.expect("commit");

    let started = Instant::now();
    let mut report = engine.export().await.expect("export");
    let elapsed = started.elapsed();
    // A late flush for a tenth of the tenants: new revisions.
    let late: Vec<UsageRecord> = (0..tenants / 10)
        .flat_map(|t| {
            [
                UsageRecord::new(format!("t{t}").as_str().into(), "requests".into(), NOON, 1),
                UsageRecord::new(format!("t{t}").as_str().into(), "tokens".into(), NOON, 1),
            ]
        })
        .collect();
    store.commit_usage(&UsageBatch::new(FlushId::new("late"), late)).await.expect("commit");
    fake.advance(std::time::Duration::from_secs(60));
    let second = engine.export().await.expect("export");
    report.events += second.events;

    let calls = standin.calls();
    let tenant_meter_hours = (tenants * 2 * 3) as f64;
    println!("tenants: {tenants}, export.calls_per_second: {rate}");
    println!(
        "first pass: {} meter events in {:.2} s = {:.1} events/s",
        report.events - second.events,
        elapsed.as_secs_f64(),
        (report.events - second.events) as f64 / elapsed.as_secs_f64()
    );
    println!("late pass: {} events (revisions)", second.events);
    println!(
        "Stripe calls: {calls} for {tenant_meter_hours} tenant-meter-hours = {:.2} per tenant-meter-hour \
         (sum meter in 15-minute windows: 4 an hour; pre-aggregated per hour: 1; plus revisions)",
        calls as f64 / tenant_meter_hours
    );
    let totals = standin.totals();
    let billed: i64 = totals.values().sum();
    println!("billed in the stand-in: {billed} units over {} customer-meters", totals.len());

    // Reconciliation of the three hours, once they have settled.
    let now = NOON + 6 * 3600;
    fake.set_unix(now);
    standin.set_now(now);
    let started = Instant::now();
    let request = tollgate::report::ReconcileRequest::new(NOON, now).fix(true);
    let r = engine.reconcile(&request).await.expect("reconcile");
    let elapsed = started.elapsed();
    println!(
        "reconciliation: {} reads of Stripe ({} summary reads) for {tenants} tenants x 1 sum meter, {} hours \
         compared, {} entries of the pre-aggregated meter not compared, {} hours of drift, in {:.2} s",
        r.reads,
        standin.summary_reads(),
        r.compared,
        r.not_compared,
        r.drift.len(),
        elapsed.as_secs_f64()
    );
}
