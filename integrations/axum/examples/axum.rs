//! An axum API behind tollgate: three plans, a route whose handler reports tokens, the
//! client's address, every route a tenant calls about itself (its usage, charged nothing; its
//! spend cap, auto-recharge and alert endpoint), and a final flush on Ctrl-C.
//!
//! Run it:
//!
//! ```text
//! cargo run -p tollgate-axum --example axum
//! ```
//!
//! and try, from another terminal:
//!
//! ```text
//! curl -i localhost:3000/v1/items -H 'x-api-key: tg_free_acme'       # 200, RateLimit headers
//! curl -i -X POST localhost:3000/v1/generate -H 'x-api-key: tg_free_acme'  # tokens left this day
//! for i in $(seq 12); do curl -s -o /dev/null -w '%{http_code} ' localhost:3000/v1/items -H 'x-api-key: tg_free_acme'; done
//!                                                                     # 200s, then 429 (rate 2/s, burst 5)
//! curl -i localhost:3000/v1/items                                     # 401 problem+json
//! curl -i localhost:3000/v1/items -H 'x-api-key: tg_pro_globex'       # the pro plan
//! curl -s localhost:3000/v1/usage -H 'x-api-key: tg_free_acme'        # its own usage, charged nothing
//! curl -s localhost:3000/v1/spend/cap -H 'x-api-key: tg_metered_umbrella'   # $1.00 a day, hard
//! curl -s -X PUT localhost:3000/v1/spend/cap -H 'x-api-key: tg_metered_umbrella' \
//!      -d '{"limit": "0.50", "mode": "hard"}'                         # its own cap, up to $5.00
//! for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code} ' -X POST localhost:3000/v1/generate \
//!      -H 'x-api-key: tg_metered_umbrella'; done                      # 200 200 402: $0.25 each
//! curl -s localhost:3000/v1/credits/recharge -H 'x-api-key: tg_free_acme'   # 403: no recharge on free
//! curl -s localhost:3000/v1/alerts/endpoint -H 'x-api-key: tg_free_acme'    # 404: none registered
//! ```
#![allow(missing_docs)]

use std::net::SocketAddr;

use axum::{
    routing::{get, post},
    Router,
};
use tollgate_axum::Tenant;

// A memory store keeps the example self-contained; the embedded durable default is
// `[store] kind = "sqlite"` (tollgate's `sqlite` feature), DynamoDB for a fleet.
pub(crate) const CONFIG: &str = r#"
[store]
kind = "memory"

[limits]
headers = "draft"

[usage]
flush_interval = "5s"

[meters.requests]
[meters.tokens]

[billing]
currency = "usd"

[plans.free]
rate = "2/s"
burst = 5
quotas.requests = { limit = 100, period = "day" }
quotas.tokens = { limit = 2000, period = "day" }

[plans.pro]
rate = "100/s"
burst = 200

# A token costs $0.001, and a spend cap of $1.00 a day refuses with 402 the work that would
# pass it; the tenant sets its own cap up to $5.00 (`PUT /v1/spend/cap`).
[plans.metered]
rate = "10/s"
burst = 10
prices.tokens = "0.001"
spend = { limit = "1.00", period = "day", mode = "hard", max_limit = "5.00" }

[[routes]]
method = "POST"
path = "/v1/generate"
reports = ["tokens"]

[tenants.acme]
plan = "free"
keys = ["tg_free_acme"]

[tenants.globex]
plan = "pro"
keys = ["tg_pro_globex"]

[tenants.umbrella]
plan = "metered"
keys = ["tg_metered_umbrella"]
"#;

async fn items(tenant: Tenant) -> String {
    format!("items for {} on {}\n", tenant.tenant(), tenant.plan())
}

async fn generate(tenant: Tenant) -> String {
    let tokens = 250; // what the model generated
    tenant.record("tokens", tokens).expect("the tokens meter is declared");
    match tenant.quota("tokens") {
        Some(q) => format!("{tokens} tokens generated; {} of {} left today\n", q.remaining, q.limit),
        None => format!("{tokens} tokens generated\n"),
    }
}

async fn addr(address: Option<axum::Extension<tollgate::door::ClientAddr>>) -> String {
    format!("{:?}\n", address.map(|a| a.0 .0))
}

/// The application: the API and the tenant's own routes behind tollgate's layer, its usage
/// outside it (polling charges nothing).
pub(crate) fn app(engine: tollgate::Tollgate) -> Router {
    let api = Router::new()
        .route("/v1/items", get(items))
        .route("/v1/generate", post(generate))
        .route("/v1/addr", get(addr))
        .route("/v1/spend/cap", tollgate_axum::spend_cap(engine.clone()))
        .route("/v1/credits/recharge", tollgate_axum::recharge(engine.clone()))
        .route("/v1/alerts/endpoint", tollgate_axum::alert_endpoint(engine.clone()))
        .layer(tollgate::TollgateLayer::new(engine.clone()));
    Router::new()
        .merge(api)
        .route("/v1/usage", tollgate_axum::usage(engine))
        .layer(axum::middleware::from_fn(tollgate_axum::client_addr))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = tollgate::Config::from_toml_str(CONFIG)?;
    let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
    let worker = tokio::spawn(worker.run());
    let app = app(engine.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000 (Ctrl-C or SIGTERM to stop)");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(tollgate_axum::shutdown_signal())
        .await?;
    // The last usage reaches the store; leases go back.
    let report = engine.shutdown().await?;
    println!("flushed {} usage records", report.flush.records);
    worker.await?;
    Ok(())
}
