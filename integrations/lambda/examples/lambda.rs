//! A Lambda function behind tollgate: an HTTP handler (API Gateway or a function URL) whose
//! tenants are held to their plans, with usage flushed between invocations, and every route
//! a tenant calls about itself: its usage (charged nothing), its spend cap, its auto-recharge
//! and its alert endpoint.
//!
//! Run it locally with cargo-lambda (`pip install cargo-lambda`), from the workspace root:
//!
//! ```text
//! cargo lambda watch -p tollgate-lambda --bin tollgate-lambda-example --features example
//! ```
//!
//! and try, from another terminal (cargo-lambda serves function URL events on port 9000):
//!
//! ```text
//! curl -i localhost:9000/v1/items -H 'x-api-key: tg_free_acme'    # 200, RateLimit headers
//! for i in $(seq 8); do curl -s -o /dev/null -w '%{http_code} ' localhost:9000/v1/items -H 'x-api-key: tg_free_acme'; done
//!                                                                  # 200s, then 429
//! curl -i localhost:9000/v1/items                                  # 401 problem+json
//! curl -s localhost:9000/v1/usage -H 'x-api-key: tg_free_acme'     # its own usage, charged nothing
//! curl -s localhost:9000/v1/spend/cap -H 'x-api-key: tg_metered_umbrella'   # $1.00 a day, hard
//! curl -s -X PUT localhost:9000/v1/spend/cap -H 'x-api-key: tg_metered_umbrella' \
//!      -d '{"limit": "0.50", "mode": "hard"}'                      # its own cap, up to $5.00
//! curl -s -X POST localhost:9000/v1/generate -H 'x-api-key: tg_metered_umbrella'  # 250 tokens, $0.25
//! curl -s localhost:9000/v1/credits/recharge -H 'x-api-key: tg_free_acme'   # 403: no recharge on free
//! curl -s localhost:9000/v1/alerts/endpoint -H 'x-api-key: tg_free_acme'    # 404: none registered
//! ```
//!
//! Deployed (`cargo lambda build --release -p tollgate-lambda
//! --bin tollgate-lambda-example --features example`, then `cargo lambda deploy`),
//! point `[store]` at DynamoDB so that every environment shares the quotas
//! (integrations/lambda/docs/guide.md).
#![allow(missing_docs)]

use lambda_http::{service_fn, Body, Error, Request, Response};

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
quotas.requests = { limit = 100, period = "day", lease = 5 }

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

[tenants.umbrella]
plan = "metered"
keys = ["tg_metered_umbrella"]
"#;

/// The application, behind tollgate's layer: the tenant's own routes answered by
/// tollgate_lambda, the API's own by the handler.
pub(crate) async fn handler(engine: &tollgate::Tollgate, request: Request) -> Result<Response<Body>, Error> {
    match request.uri().path() {
        "/v1/spend/cap" => return Ok(tollgate_lambda::spend_cap(engine, &request).await),
        "/v1/credits/recharge" => return Ok(tollgate_lambda::recharge(engine, &request).await),
        "/v1/alerts/endpoint" => return Ok(tollgate_lambda::alert_endpoint(engine, &request).await),
        _ => {}
    }
    let tenant = request.extensions().get::<tollgate::TenantContext>().expect("behind tollgate");
    if request.uri().path() == "/v1/generate" {
        let tokens = 250; // what the model generated
        tenant.record("tokens", tokens)?;
        return Ok(Response::new(Body::from(format!("{tokens} tokens generated for {}\n", tenant.tenant()))));
    }
    let from = request.extensions().get::<tollgate::door::ClientAddr>().map(|a| a.0);
    let left = tenant.quota("requests").map(|q| q.remaining);
    Ok(Response::builder()
        .header("content-type", "text/plain")
        .body(Body::from(format!("hello {} (from {from:?}); {left:?} requests left today\n", tenant.tenant())))?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = tollgate::Config::from_toml_str(CONFIG)?;
    let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
    let app = engine.clone();
    let api = service_fn(move |request| {
        let engine = app.clone();
        async move { handler(&engine, request).await }
    });
    // `/v1/usage` is answered in front of the layer: polling it charges nothing.
    tollgate_lambda::run_with_usage(engine, worker, "/v1/usage", api).await
}
