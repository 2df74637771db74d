//! An actix-web API behind tollgate's middleware: two plans, a route whose handler reports
//! tokens, and a final flush when the server stops.
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
//! ```
#![allow(missing_docs)]

use actix_web::{web, App, HttpMessage, HttpRequest, HttpServer};
use tollgate_actix::{Tenant, TollgateMiddleware};

// A memory store keeps the example self-contained; the embedded durable default is
// `[store] kind = "sqlite"` (tollgate's `sqlite` feature), DynamoDB for a fleet.
const CONFIG: &str = r#"
[store]
kind = "memory"

[limits]
headers = "draft"

[usage]
flush_interval = "5s"

[meters.requests]
[meters.tokens]

[plans.free]
rate = "2/s"
burst = 5
quotas.requests = { limit = 100, period = "day" }
quotas.tokens = { limit = 2000, period = "day" }

[plans.pro]
rate = "100/s"
burst = 200

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

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = tollgate::Config::from_toml_str(CONFIG)?;
    let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
    let worker = tokio::spawn(worker.run());
    let app_engine = engine.clone();
    // actix-web's HttpServer stops gracefully on SIGTERM and SIGINT itself.
    println!("listening on http://127.0.0.1:8080 (Ctrl-C or SIGTERM to stop)");
    HttpServer::new(move || {
        App::new()
            .wrap(TollgateMiddleware::new(app_engine.clone()))
            .route("/v1/items", web::get().to(items))
            .route("/v1/generate", web::post().to(generate))
            .route("/v1/orders", web::post().to(order))
    })
    .bind(("127.0.0.1", 8080))?
    .run()
    .await?;
    // The server has stopped taking requests: the last usage reaches the store.
    let report = engine.shutdown().await?;
    println!("flushed {} usage records", report.flush.records);
    worker.await?;
    Ok(())
}
