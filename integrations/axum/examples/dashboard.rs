//! The operator dashboard mounted in an axum API: tenants seeded, a few requests served (some
//! refused), usage flushed, a dead letter and an alert written, then the API and the dashboard
//! served on one port. The browser test (`scripts/dashboard-browser.sh`) drives it.
//!
//! Run it:
//!
//! ```text
//! echo 'an-access-token-for-the-dashboard' > /tmp/dashboard-token
//! TOLLGATE_DASHBOARD_TOKEN_FILE=/tmp/dashboard-token \
//!   cargo run -p tollgate-axum --features dashboard --example dashboard
//! ```
//!
//! and open <http://127.0.0.1:3000/ops/> (the token signs you in). With `TOLLGATE_DB` the
//! SQLite file is chosen (default `dashboard.db`); `tollgate dashboard` reads the same file.
//!
//! With `TOLLGATE_SEED=week` it also fills the store with a week of traffic of 50 more tenants
//! (the pictures of docs/dashboard.md are taken from it): the past week's usage per hour as
//! flushes would have written it (a daily rhythm, bursts), and today's through the layer:
//! free tenants past their rate (refused), pro tenants spending their prepaid credits, some
//! to the end (refused 402), teams spending money under a monthly cap (one past it, refused).
#![allow(missing_docs)]

use std::{net::SocketAddr, sync::Arc};

use axum::{routing::get, Router};
use tollgate::{
    admin::{Admin, KeyOptions},
    dashboard::{Access, Dashboard},
    store::{AlertKey, ExportStore, OutboxEntry, OutboxStore, SqliteStore},
    Config, Tollgate, TollgateLayer,
};
use tower::ServiceExt as _;

/// The tenant whose id is markup: the dashboard shows it as text.
pub const HOSTILE: &str = "<script>alert(1)</script>";
/// The tenant of the configuration file whose id is markup (its customers too).
pub const FILE_HOSTILE: &str = "<img/src=x/onerror=alert(2)>";

fn config(db: &str, token_file: &str) -> String {
    format!(
        r#"
[store]
kind = "sqlite"
path = "{db}"

[identify]
source = "api-key"
header = "x-api-key"
unknown = "reject"

[usage]
flush_interval = "1s"
window = "1h"

[export]
sink = "jsonl"
file = "{db}.usage.jsonl"

[billing]
currency = "usd"

[meters.requests]
price = "0.01"
[meters.credits]

[plans.free]
rate = "2/h"
burst = 2
quotas.requests = {{ limit = 100, period = "day", mode = "hard" }}

[plans.pro]
rate = "50/s"
burst = 50
quotas.requests = {{ limit = 1000, period = "day", mode = "soft" }}
quotas.credits = {{ period = "prepaid" }}
features = ["generate"]

[plans.team]
rate = "1000/s"
burst = 1000
quotas.requests = {{ limit = 5000, period = "day", mode = "soft" }}
spend = {{ limit = "5.00", period = "month", mode = "hard", max_limit = "10.00" }}

[[routes]]
method = "POST"
path = "/v1/generate"
meter = "credits"
cost = 2
feature = "generate"

# A tenant of the file whose id and customer are markup: shown as text on every page.
[tenants."<img/src=x/onerror=alert(2)>"]
plan = "team"
stripe_customer = "cus_<b>file</b>"
metronome_customer = "m_<i>file</i>"

[dashboard]
token_file = "{token_file}"
"#
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = std::env::var("TOLLGATE_DB").unwrap_or_else(|_| "dashboard.db".to_owned());
    let token_file = std::env::var("TOLLGATE_DASHBOARD_TOKEN_FILE")?;
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let text = config(&db, &token_file);
    let config = Config::from_toml_str(&text)?;
    // Beside the database, for `tollgate --config <db>.toml dashboard` over the same stores.
    std::fs::write(format!("{db}.toml"), &text)?;
    let (engine, worker) = Tollgate::builder(config.clone()).open().await?;
    tokio::spawn(worker.run());

    // Tenants and keys, as `tollgate tenants add` and `tollgate keys issue` would, recorded
    // in the audit as made by an operator whose name is markup (shown as text).
    let admin = Admin::for_engine(&engine).operator("seed\"'><b>ops</b>");
    let mut keys = Vec::new();
    for (id, plan, customer) in [("acme", "pro", Some("cus_acme")), (HOSTILE, "free", None), ("globex", "free", None)] {
        if admin.tenant(id).await?.is_none() {
            admin.add_tenant(id, plan, customer).await?;
        }
        keys.push(admin.issue_key(id, KeyOptions::default()).await?.key);
    }
    admin.grant_credits("acme", "credits", 500, None, "pack-1").await?;
    // A grant id with quotes and markup: shown as text in a cell and an attribute alike.
    admin.grant_credits("acme", "credits", 10, None, "g\"'><b>q</b>").await?;

    // Requests through the layer: acme spends 7 requests and 3 generations (6 credits); the
    // hostile tenant sends 5 on a rate of 2 an hour with a burst of 2, and 3 are refused.
    let api = Router::new()
        .route("/v1/items", get(|| async { "items\n" }))
        .route("/v1/generate", axum::routing::post(|| async { "generated\n" }))
        .layer(TollgateLayer::new(engine.clone()));
    let call = |method: &str, path: &str, key: &str| {
        http::Request::builder().method(method).uri(path).header("x-api-key", key).body(axum::body::Body::empty())
    };
    for _ in 0..7 {
        api.clone().oneshot(call("GET", "/v1/items", &keys[0])?).await?;
    }
    for _ in 0..3 {
        api.clone().oneshot(call("POST", "/v1/generate", &keys[0])?).await?;
    }
    for _ in 0..5 {
        api.clone().oneshot(call("GET", "/v1/items", &keys[1])?).await?;
    }
    // globex sends 6 on the same rate: 4 refused, more than the hostile tenant's 3.
    for _ in 0..6 {
        api.clone().oneshot(call("GET", "/v1/items", &keys[2])?).await?;
    }
    engine.flush().await?;

    // A dead letter (the hostile tenant's window, refused with markup in its reason) and an
    // alert waiting for delivery, written to the store as the exporter and a flush would.
    let store = Arc::new(SqliteStore::open(&db).await?);
    let now = engine.clock().unix_secs();
    let pending = store.pending_exports(now + 3600, None, 100).await?;
    if let Some(window) = pending.iter().find(|a| a.key.tenant.as_str() == HOSTILE) {
        store.dead_letter(window, "refused: <b>No such customer</b>").await?;
    }
    let alert = OutboxEntry::new(
        AlertKey::new("quota.threshold_crossed:acme:requests:80", "https://ops.example.com/hooks?token=secret"),
        "acme".into(),
        "quota.threshold_crossed",
        "{}",
        now,
        now + 86_400,
    );
    store.put_alerts(&[alert]).await?;

    if std::env::var("TOLLGATE_SEED").as_deref() == Ok("week") {
        seed_week(&engine, &admin.clone().operator("ana@ops"), &store, &api).await?;
    }

    let dashboard = Dashboard::for_engine(&engine, Access::from_config(&config)?);
    let app = api.merge(tollgate_axum::dashboard("/ops", dashboard));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("dashboard on http://{}/ops/", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(tollgate_axum::shutdown_signal()).await?;
    engine.shutdown().await?;
    Ok(())
}

/// The 50 tenants of `TOLLGATE_SEED=week`.
const NAMES: [&str; 50] = [
    "northwind",
    "contoso",
    "fabrikam",
    "initech",
    "umbrella",
    "hooli",
    "piedpiper",
    "aviato",
    "stark",
    "wayne",
    "wonka",
    "tyrell",
    "cyberdyne",
    "soylent",
    "oscorp",
    "gringotts",
    "monarch",
    "vandelay",
    "dunder",
    "sterling",
    "prestige",
    "nakatomi",
    "duff",
    "krusty",
    "acmecorp",
    "bluth",
    "globochem",
    "massive",
    "virtucon",
    "zorg",
    "weyland",
    "tessier",
    "rekall",
    "omni",
    "yoyodyne",
    "spacely",
    "cogswell",
    "kramerica",
    "pendant",
    "primatech",
    "veridian",
    "sirius",
    "ingen",
    "biffco",
    "lacuna",
    "macguffin",
    "axiom",
    "planetexpress",
    "momcorp",
    "abstergo",
];

/// A small deterministic generator (xorshift): the same week every run.
struct Draw(u64);

impl Draw {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below.max(1)
    }
}

/// A week of traffic of 50 tenants: the past 7 days' usage per hour, written as flushes write
/// it (each tenant's history one batch), and today's through the layer (refusals included).
async fn seed_week(
    engine: &Tollgate,
    admin: &Admin,
    store: &SqliteStore,
    api: &Router,
) -> Result<(), Box<dyn std::error::Error>> {
    use tollgate::store::{FlushId, Tally, TallyScope, UsageBatch, UsageRecord, UsageStore};
    let mut draw = Draw(0x5eed_2026_1204);
    let now = engine.clock().unix_secs();
    let today = now - now % 86_400;
    let call = |method: &str, path: &str, key: &str| {
        http::Request::builder().method(method).uri(path).header("x-api-key", key).body(axum::body::Body::empty())
    };
    for (i, name) in NAMES.iter().enumerate() {
        let pro = i % 3 == 0;
        // A team's requests are priced (0.01 USD each) under a monthly spend cap of 5.00.
        let team = i % 6 == 1;
        if admin.tenant(name).await?.is_some() {
            continue;
        }
        let customer = (pro || team).then(|| format!("cus_{name}"));
        let plan = if pro {
            "pro"
        } else if team {
            "team"
        } else {
            "free"
        };
        admin.add_tenant(name, plan, customer.as_deref()).await?;
        let key = admin.issue_key(name, KeyOptions::default()).await?.key;
        // Its size: pro tenants up to ~50 requests an hour at their peak, free ones up to 2.
        let peak = if pro { 5 + draw.next(45) } else { 1 + draw.next(2) };
        let mut records = Vec::new();
        // History up to today: today's usage is the layer's (below), so that a tenant's
        // gauges (the quota store's) and its charts (the usage store's) agree.
        let mut start = (today - 7 * 86_400).max(0);
        while start < today {
            let hour_of_day = (start % 86_400) / 3600;
            // Quiet at night (UTC), busiest in the afternoon; now and then a burst.
            let rhythm =
                [2, 1, 1, 1, 1, 2, 3, 5, 7, 8, 9, 10, 10, 10, 9, 9, 8, 7, 6, 5, 4, 3, 3, 2][hour_of_day as usize];
            let mut n = peak * rhythm / 10 + draw.next(peak / 4 + 1);
            if draw.next(40) == 0 {
                n *= 4;
            }
            if !pro {
                n = n.min(2);
            }
            if n > 0 {
                records.push(UsageRecord::new((*name).into(), "requests".into(), start, n));
                if pro {
                    records.push(UsageRecord::new((*name).into(), "credits".into(), start, 2 * (n / 3)));
                }
            }
            start += 3600;
        }
        // The last 24 hours' requests as the nodes' tallies count them (the overview's): four
        // minutes of each hour (the current one's up to now), now and then some refused: a free tenant past its rate, a pro
        // one out of credits, a team at its cap.
        let (mut tallies, mut today_counts) = (Vec::new(), (0u64, 0u64));
        let refusal = if pro {
            "credits_exhausted"
        } else if team {
            "spend_cap_reached"
        } else {
            "rate_limited"
        };
        let this_hour = now - now % 3600;
        let mut hour = this_hour - 24 * 3600;
        while hour <= this_hour {
            let rhythm = [2, 1, 1, 1, 1, 2, 3, 5, 7, 8, 9, 10, 10, 10, 9, 9, 8, 7, 6, 5, 4, 3, 3, 2]
                [((hour % 86_400) / 3600) as usize];
            let n = (peak * rhythm / 10 + draw.next(peak / 4 + 1)) * if pro || team { 4 } else { 1 };
            for quarter in 0..4 {
                let minute = hour + ((quarter * 15 + draw.next(15)) * 60) as i64;
                if minute > now - 120 {
                    // The last minutes are the layer's own (below).
                    continue;
                }
                let admitted = n / 4 + u64::from(quarter < n % 4);
                let refused = if draw.next(if pro || team { 12 } else { 3 }) == 0 { 1 + draw.next(3) } else { 0 };
                let mut counts = vec![("admitted".to_owned(), admitted)];
                if team {
                    // 0.01 USD a request, in nano-units.
                    counts.push(("spent_nanos".to_owned(), admitted * 10_000_000));
                }
                if refused > 0 {
                    counts.push((refusal.to_owned(), refused));
                }
                if admitted + refused > 0 {
                    tallies.push(Tally::new(TallyScope::Fleet, minute, counts));
                }
                if minute >= today {
                    today_counts = (today_counts.0 + admitted, today_counts.1 + refused);
                }
            }
            hour += 3600;
        }
        if today_counts != (0, 0) {
            let mut counts = vec![("admitted".to_owned(), today_counts.0), (refusal.to_owned(), today_counts.1)];
            if team {
                counts.push(("spent_nanos".to_owned(), today_counts.0 * 10_000_000));
            }
            tallies.push(Tally::new(TallyScope::Tenant((*name).into()), today, counts));
        }
        let batch = UsageBatch::new(FlushId::new(format!("seed-week-{name}")), records).with_tallies(tallies);
        store.commit_usage(&batch).await?;
        // Today, through the layer.
        if pro {
            // Some spend their balance to the end, and are refused (402): a small balance (even:
            // a generation costs 2 credits), spent within the rate's burst (a generation takes 2
            // of its 50 cells).
            let spender = i % 2 == 0;
            let granted = if spender { 2 * (5 + draw.next(15)) } else { 200 + draw.next(800) };
            admin.grant_credits(name, "credits", granted, None, "pack-1").await?;
            let generations = if spender { granted / 2 + 2 } else { draw.next(20) };
            for _ in 0..generations {
                api.clone().oneshot(call("POST", "/v1/generate", &key)?).await?;
            }
            for _ in 0..draw.next(40) {
                api.clone().oneshot(call("GET", "/v1/items", &key)?).await?;
            }
        } else if team {
            // One team lowered its cap (the audit's page shows the change).
            if i == 7 {
                admin.set_spend_cap(name, Some("4.50"), tollgate::config::QuotaMode::Hard).await?;
            }
            // Spending up to its cap; the first team spends past it and is refused (402).
            let n = if i == 1 { 520 } else { 20 + draw.next(400) };
            for _ in 0..n {
                api.clone().oneshot(call("GET", "/v1/items", &key)?).await?;
            }
        } else {
            // A rate of 2 an hour: what passes the burst is refused (429).
            for _ in 0..1 + draw.next(5) {
                api.clone().oneshot(call("GET", "/v1/items", &key)?).await?;
            }
        }
    }
    engine.flush().await?;
    Ok(())
}
