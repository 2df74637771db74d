//! A Lambda function behind tollgate: an HTTP handler (API Gateway or a function URL) whose
//! tenants are held to their plans, with usage flushed between invocations.
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
const CONFIG: &str = r#"
[store]
kind = "memory"

[limits]
headers = "draft"

[usage]
flush_interval = "5s"

[meters.requests]

[plans.free]
rate = "2/s"
burst = 5
quotas.requests = { limit = 100, period = "day", lease = 5 }

[tenants.acme]
plan = "free"
keys = ["tg_free_acme"]
"#;

async fn handler(request: Request) -> Result<Response<Body>, Error> {
    let tenant = request.extensions().get::<tollgate::TenantContext>().expect("behind tollgate");
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
    tollgate_lambda::run(engine, worker, service_fn(handler)).await
}
