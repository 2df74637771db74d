//! An actix-web API behind tollgate's middleware: three plans, a route whose handler reports
//! tokens, every route a tenant calls about itself (its usage, charged nothing; its spend cap,
//! auto-recharge and alert endpoint), and a final flush when the server stops.
//!
//! Run it:
//!
//! ```text
//! cargo run -p tollgate-actix --example actix
//! ```
//!
//! and try, from another terminal:
//!
//! ```text
//! curl -i localhost:8080/v1/items -H 'x-api-key: tg_free_acme'       # 200, RateLimit headers
//! curl -i -X POST localhost:8080/v1/generate -H 'x-api-key: tg_free_acme'  # tokens left this day
//! for i in $(seq 12); do curl -s -o /dev/null -w '%{http_code} ' localhost:8080/v1/items -H 'x-api-key: tg_free_acme'; done
//!                                                                     # 200s, then 429 (rate 2/s, burst 5)
//! curl -i localhost:8080/v1/items                                     # 401 problem+json
//! curl -i -X POST localhost:8080/v1/orders -H 'x-api-key: tg_pro_globex' -H 'idempotency-key: o-1'
//! curl -i -X POST localhost:8080/v1/orders -H 'x-api-key: tg_pro_globex' -H 'idempotency-key: o-1'
//!                                                                     # a replay: not charged again
//! curl -s localhost:8080/v1/usage -H 'x-api-key: tg_free_acme'        # its own usage, charged nothing
//! curl -s localhost:8080/v1/spend/cap -H 'x-api-key: tg_metered_umbrella'   # $1.00 a day, hard
//! curl -s -X PUT localhost:8080/v1/spend/cap -H 'x-api-key: tg_metered_umbrella' \
//!      -d '{"limit": "0.50", "mode": "hard"}'                         # its own cap, up to $5.00
//! for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code} ' -X POST localhost:8080/v1/generate \
//!      -H 'x-api-key: tg_metered_umbrella'; done                      # 200 200 402: $0.25 each
//! curl -s localhost:8080/v1/credits/recharge -H 'x-api-key: tg_free_acme'   # 403: no recharge on free
//! curl -s localhost:8080/v1/alerts/endpoint -H 'x-api-key: tg_free_acme'    # 404: none registered
//! ```
#![allow(missing_docs)]

use actix_web::{web, App, HttpMessage, HttpRequest, HttpServer};
use tollgate_actix::{Tenant, TollgateMiddleware};

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

async fn items(tenant: Tenant, request: HttpRequest) -> String {
    let from = request.extensions().get::<tollgate::door::ClientAddr>().map(|a| a.0);
    format!("items for {} on {} (from {from:?})\n", tenant.tenant(), tenant.plan())
}

async fn generate(tenant: Tenant) -> String {
    let tokens = 250; // what the model generated
    tenant.record("tokens", tokens).expect("the tokens meter is declared");
    match tenant.quota("tokens") {
        Some(q) => format!("{tokens} tokens generated; {} of {} left today\n", q.remaining, q.limit),
        None => format!("{tokens} tokens generated\n"),
    }
}

async fn order(tenant: Tenant) -> String {
    format!("order placed for {}{}\n", tenant.tenant(), if tenant.is_replay() { " (replay)" } else { "" })
}

/// The application's routes: the tenant's usage registered first, outside the middleware
/// (polling it charges nothing), then the API and the tenant's own routes inside it.
pub(crate) fn routes(engine: tollgate::Tollgate) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config.route("/v1/usage", tollgate_actix::usage(engine.clone())).service(
            web::scope("/v1")
                .wrap(TollgateMiddleware::new(engine.clone()))
                .route("/items", web::get().to(items))
                .route("/generate", web::post().to(generate))
                .route("/orders", web::post().to(order))
                .route("/spend/cap", tollgate_actix::spend_cap(engine.clone()))
                .route("/credits/recharge", tollgate_actix::recharge(engine.clone()))
                .route("/alerts/endpoint", tollgate_actix::alert_endpoint(engine)),
        );
    }
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = tollgate::Config::from_toml_str(CONFIG)?;
    let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
    let worker = tokio::spawn(worker.run());
    let app_engine = engine.clone();
    // actix-web's HttpServer stops gracefully on SIGTERM and SIGINT itself.
    println!("listening on http://127.0.0.1:8080 (Ctrl-C or SIGTERM to stop)");
    HttpServer::new(move || App::new().configure(routes(app_engine.clone()))).bind(("127.0.0.1", 8080))?.run().await?;
    // The server has stopped taking requests: the last usage reaches the store.
    let report = engine.shutdown().await?;
    println!("flushed {} usage records", report.flush.records);
    worker.await?;
    Ok(())
}
