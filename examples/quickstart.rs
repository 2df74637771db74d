//! Run with: `cargo run --example quickstart`
//!
//! An axum service behind tollgate, on the embedded durable store (SQLite, `tollgate.db` in the
//! working directory): no AWS or Stripe account. Stop it and start it again: spent quotas stay
//! spent, and usage not yet exported is exported when its window closes. Delete `tollgate.db`
//! to start afresh.
//! It listens on `127.0.0.1:$PORT` (3000 by default) and reads `examples/quickstart.toml`, or
//! the file named by `TOLLGATE_CONFIG`. Closed usage windows are written as JSON lines to
//! `tollgate-usage.jsonl` (or `TOLLGATE_USAGE_FILE`): what would be billed.
//!
//! With a `[stripe]` section in the configuration it exports to Stripe instead (never to both:
//! billing split between a file and Stripe is billing lost): built with `--features stripe`
//! and with the key in `STRIPE_SECRET_KEY` (or `[stripe] secret_key_file`), closed windows go
//! to Stripe Billing Meters (`[stripe] api_base` for a local stand-in); without the key, this
//! process exports nothing and says so (a `tollgate export` job with the key does). It prints
//! which it does at start.
//!
//! Try:
//! ```text
//! curl -i localhost:3000/v1/items -H 'x-api-key: tg_test_free_acme'
//! curl -i -X POST localhost:3000/v1/generate -H 'x-api-key: tg_test_free_acme'   # costs 5
//! curl -i localhost:3000/v1/items                                                # 401
//! for i in $(seq 25); do curl -s -o /dev/null -w '%{http_code} ' localhost:3000/v1/items \
//!     -H 'x-api-key: tg_test_free_acme'; sleep 0.5; done                          # 200s, then 429s
//! (for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code} ' -X POST localhost:3000/v1/generate/slow \
//!     -H 'x-api-key: tg_test_pro_globex' & done; wait)       # 429 at once, then 200 200 (2 s)
//! curl -s localhost:3000/v1/usage -H 'x-api-key: tg_test_free_acme'   # its own usage, charged nothing
//! curl -s localhost:3000/v1/spend/cap -H 'x-api-key: tg_test_free_acme'        # 403: no cap on free
//! curl -s localhost:3000/v1/alerts/endpoint -H 'x-api-key: tg_test_free_acme'  # 404: none registered
//! curl -s localhost:3000/v1/spend/cap -H 'x-api-key: tg_test_metered_umbrella' # $1.00 a day, hard
//! curl -s -X PUT localhost:3000/v1/spend/cap -H 'x-api-key: tg_test_metered_umbrella' \
//!     -d '{"limit": "0.10", "mode": "hard"}'                                    # its own cap: $0.10
//! for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code} ' -X POST localhost:3000/v1/complete \
//!     -H 'x-api-key: tg_test_metered_umbrella' -H 'x-max-tokens: 50'; done       # 200 200 402
//! curl -s localhost:3000/metrics | grep tollgate_                                # the operator's metrics
//! ```
//! With `--features dynamodb`, `TOLLGATE_STORE=dynamodb` (and `TOLLGATE_DYNAMODB_TABLE`, default
//! `tollgate`) runs it on DynamoDB with the standard AWS environment (see the README). With
//! `--features postgres`, `TOLLGATE_STORE=postgres` and `DATABASE_URL` run it on PostgreSQL
//! (schema `tollgate`, created at start). With `--features redis`, `TOLLGATE_STORE=redis` and
//! `REDIS_URL` keep its quotas, fleet rates, places and `Idempotency-Key`s on Redis, beside its
//! SQLite file.
//!
//! With `--features otel` and `OTEL_EXPORTER_OTLP_ENDPOINT` set (an OpenTelemetry Collector's
//! OTLP/HTTP address, `http://localhost:4318`), each request's admission and its store calls
//! are sent as spans, the request's `traceparent` their parent, and tollgate's counters as
//! metrics beside `/metrics` (`service.name` `tollgate-quickstart`).
//!
//! Edit the configuration and send SIGHUP (`kill -HUP <pid>`) to reload it without losing
//! counters. Stop it with Ctrl-C: it flushes, exports closed windows and prints what it did.

use std::{net::SocketAddr, path::PathBuf};

use axum::{
    extract::Extension,
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};
use tollgate::{
    billing::{BillingSink, JsonlSink},
    Config, TenantContext, Tollgate,
};

/// Where closed windows go, said at start: Stripe when the configuration has `[stripe]` (and
/// the key is there), else the JSON-lines file. Never both.
fn sink(config: &Config, usage_file: &std::path::Path) -> Result<Option<std::sync::Arc<dyn BillingSink>>, String> {
    // A sink the configuration names (`[export] sink`): Metronome, a file, or Stripe.
    if let Some(kind) = config.export().sink {
        return match tollgate::billing::configured_sink(config) {
            Ok(sink) => {
                println!("  billing: closed windows exported by the `{}` sink", kind.as_str());
                Ok(sink)
            }
            Err(tollgate::billing::SinkSetupError::MissingSecret(why)) => {
                println!("  billing: {why}: this process exports nothing; `tollgate export` with it does");
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        };
    }
    let Some(stripe) = config.stripe() else {
        println!("  billing: closed windows written to {} (no [stripe] section)", usage_file.display());
        return Ok(Some(std::sync::Arc::new(JsonlSink::new(usage_file))));
    };
    #[cfg(feature = "stripe")]
    {
        let api = stripe.api_base.as_deref().unwrap_or("https://api.stripe.com/");
        match tollgate::billing::StripeSink::from_config(config) {
            Ok(sink) => {
                println!("  billing: closed windows exported to Stripe Billing Meters at {api}");
                Ok(Some(std::sync::Arc::new(sink)))
            }
            Err(tollgate::billing::StripeSetupError::MissingSecret { .. }) => {
                println!(
                    "  billing: [stripe] is configured but no key is set (STRIPE_SECRET_KEY or \
                     [stripe] secret_key_file): this process exports nothing; `tollgate export` with the key does"
                );
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }
    #[cfg(not(feature = "stripe"))]
    {
        let _ = stripe;
        Err("the configuration has [stripe] but this build has no Stripe support: \
             cargo run --example quickstart --features stripe"
            .to_owned())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,tollgate=debug".into()),
        )
        .init();

    // tollgate's metrics (`tollgate_*`), served at `/metrics`: the recorder is installed before
    // the engine registers them.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    // Spans and metrics over OTLP, when OTEL_EXPORTER_OTLP_ENDPOINT is set (`--features otel`).
    #[cfg(feature = "otel")]
    let otel = tollgate::otel::Otel::from_env("tollgate-quickstart")?;
    #[cfg(feature = "otel")]
    if otel.is_some() {
        println!("  OpenTelemetry: spans and metrics to {}", std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")?);
    }

    let config_path = std::env::var_os("TOLLGATE_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.toml")));
    let config = match Config::from_path(&config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let usage_file = std::env::var_os("TOLLGATE_USAGE_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tollgate-usage.jsonl"));
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);

    println!("tollgate quickstart");
    println!("  config:  {}", config_path.display());
    for plan in config.plans().values() {
        let rate = plan.rate().map_or("unlimited".to_owned(), |r| format!("{r}, burst {}", plan.burst()));
        let quotas: Vec<String> = plan
            .quotas()
            .iter()
            .map(|(m, q)| format!("{} {m}/{} ({:?})", q.limit(), q.period().name(), q.mode()).to_lowercase())
            .collect();
        println!("  plan {:<8} rate {rate}; quotas: {}", plan.id(), quotas.join(", "));
    }
    for tenant in config.tenants() {
        println!("  tenant {:<8} plan {:<6} ({} key)", tenant.id(), tenant.plan(), tenant.key_hashes().len());
    }
    let store = match config.store() {
        tollgate::config::StoreSettings::Sqlite { path, .. } => format!("SQLite, {}", path.display()),
        other => other.kind().to_owned(),
    };
    let store_env = std::env::var("TOLLGATE_STORE").unwrap_or_default();
    if store_env != "dynamodb" && store_env != "postgres" {
        println!("  store:   {store} (usage flushed every {:?})", config.usage().flush_interval);
    }
    if store_env == "redis" {
        println!(
            "  store:   quotas, fleet rates, places and Idempotency-Keys on Redis (TOLLGATE_STORE=redis, REDIS_URL)"
        );
    }
    let destination = match config.stripe() {
        None => usage_file.display().to_string(),
        Some(_) => "Stripe".to_owned(),
    };
    let sink = match sink(&config, &usage_file) {
        Ok(sink) => sink,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut builder = Tollgate::builder(config);
    if let Some(sink) = sink {
        builder = builder.billing_sink_arc(sink);
    }
    // TOLLGATE_STORE=dynamodb with TOLLGATE_DYNAMODB_TABLE: the same service on DynamoDB (the
    // standard AWS environment: region, credentials, AWS_ENDPOINT_URL_DYNAMODB for a local
    // server); the table is created if it does not exist. Needs `--features dynamodb`.
    if store_env == "dynamodb" {
        builder = builder.store_arc(dynamodb_store().await?);
    }
    // TOLLGATE_STORE=postgres with DATABASE_URL: the same service on PostgreSQL (schema
    // `tollgate`, created or migrated at start). Needs `--features postgres`.
    if store_env == "postgres" {
        builder = builder.store_arc(postgres_store().await?);
    }
    // TOLLGATE_STORE=redis with REDIS_URL: the quotas, fleet rates, places and
    // `Idempotency-Key`s on Redis (keys under `tollgate:`), beside the SQLite file for the
    // rest, so that several quickstarts share one tenant's quota. A fleet in production keeps
    // the rest on a store it shares too (docs/redis.md). Needs `--features redis`.
    if store_env == "redis" {
        builder = redis_roles(builder).await?;
    }
    let (tollgate, worker) = builder.open().await?;
    let layer = tollgate::TollgateLayer::new(tollgate.clone());
    let usage_engine = tollgate.clone();
    let worker = tokio::spawn(worker.run());
    #[cfg(feature = "otel")]
    if let Some(otel) = &otel {
        otel.observe(&tollgate);
    }

    let app = Router::new()
        .route("/", get(|| async { "hello from behind tollgate\n" }))
        .route("/v1/items", get(items))
        .route("/v1/generate", post(generate))
        .route("/v1/generate/slow", post(generate_slow))
        .route("/v1/complete", post(complete))
        // The tenant's own spend cap, auto-recharge and alert endpoint, behind the layer (what
        // `tollgate_axum::spend_cap`, `recharge` and `alert_endpoint` mount).
        .route("/v1/spend/cap", get(spend_cap).put(spend_cap).delete(spend_cap))
        .route("/v1/credits/recharge", get(recharge).put(recharge).delete(recharge))
        .route("/v1/alerts/endpoint", get(alert_endpoint).put(alert_endpoint).delete(alert_endpoint))
        .layer(layer)
        // The tenant's own usage, outside the layer: polling it charges nothing (what
        // `tollgate_axum::usage` mounts).
        .route(
            "/v1/usage",
            axum::routing::any(move |request: axum::extract::Request| {
                let answer = usage_engine.tenant_usage(&request);
                async move { answer.await.map(axum::body::Body::from) }
            }),
        )
        // The operator's metrics in Prometheus' text format (keep it off the public listener in
        // production).
        .route("/metrics", get(move || std::future::ready(prometheus.render())))
        // The client's address, for callers limited per address (anonymous callers, lookups of
        // unknown keys) and their `Idempotency-Key`s: what `tollgate_axum::client_addr` does.
        .layer(axum::middleware::from_fn(client_addr))
        .layer(Extension(tollgate.clone()));
    // The whole Stripe path: with `[stripe]` and a webhook signing secret, plans follow Stripe's
    // subscriptions through `POST /stripe/webhook` (outside the layer: Stripe is not a tenant),
    // and the worker reconciles what Stripe holds with what was exported.
    let app = stripe_routes(app, &tollgate);

    // `kill -HUP <pid>` reloads the configuration: counters and recorded usage are kept.
    #[cfg(unix)]
    {
        let tollgate = tollgate.clone();
        let path = config_path.clone();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let reloaded = match Config::from_path(&path) {
                    Ok(config) => tollgate.reload(config).await,
                    Err(e) => Err(e),
                };
                match reloaded {
                    Ok(()) => println!("reloaded {}", path.display()),
                    Err(e) => eprintln!("reload refused, the running configuration stays: {e}"),
                }
            }
        });
    }

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("  listening on http://{addr}  (Ctrl-C or SIGTERM to stop)");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown_signal())
        .await?;

    let report = tollgate.shutdown().await?;
    worker.await?;
    let stats = tollgate.stats();
    // Money apart from units: what the priced meters cost, in the currency.
    let spent = match &tollgate.config().billing().currency {
        Some(currency) => format!(", {} {currency} spent", tollgate::money::amount_of(stats.flushed_spend_nanos)),
        None => String::new(),
    };
    println!(
        "stopped: flushed {} units in {} batches{spent}; exported {} events ({} units) to {}",
        stats.flushed_units, stats.flushes, stats.exported_events, stats.exported_units, destination
    );
    let _ = report;
    // What the exporters batched is sent before the process ends.
    #[cfg(feature = "otel")]
    if let Some(otel) = otel {
        // It waits for the exporters: off the runtime's threads.
        tokio::task::spawn_blocking(move || otel.shutdown()).await??;
    }
    Ok(())
}

/// `POST /stripe/webhook` when the configuration has `[stripe]` and a webhook signing secret is
/// set (`STRIPE_WEBHOOK_SECRET` or `[stripe] webhook_secret_file`; Stripe's meter errors too with
/// `STRIPE_EVENT_DESTINATION_SECRET`); said at start, with the reconciliation schedule.
#[cfg(feature = "stripe")]
fn stripe_routes(app: Router, tollgate: &Tollgate) -> Router {
    let config = tollgate.config();
    if config.stripe().is_none() {
        return app;
    }
    // Reconciliation reads Stripe with the key: only when this process exports.
    let every = config.export().reconcile_interval;
    if tollgate::billing::StripeSink::from_config(&config).is_ok() {
        if every.is_zero() {
            println!("  reconcile: off (export.reconcile_interval = 0); `tollgate reconcile` runs it");
        } else {
            println!("  reconcile: what Stripe holds against what was exported, every {every:?}");
        }
    }
    let handler = match tollgate.webhook_handler() {
        Ok(handler) => std::sync::Arc::new(handler),
        Err(e) => {
            println!("  webhooks: off ({e})");
            return app;
        }
    };
    println!("  webhooks: POST /stripe/webhook (plans follow Stripe subscriptions)");
    app.route(
        "/stripe/webhook",
        post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let handler = handler.clone();
            async move {
                let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
                let reply = handler.handle(signature, &body).await.into_response();
                reply.map(axum::body::Body::from)
            }
        })
        // Read up to the handler's cap (one byte more: it answers 413).
        .layer(axum::extract::DefaultBodyLimit::max(tollgate::billing::WebhookHandler::MAX_BODY + 1)),
    )
}

#[cfg(not(feature = "stripe"))]
fn stripe_routes(app: Router, _: &Tollgate) -> Router {
    app
}

#[cfg(feature = "dynamodb")]
async fn dynamodb_store() -> Result<std::sync::Arc<dyn tollgate::store::Store>, Box<dyn std::error::Error>> {
    let table = std::env::var("TOLLGATE_DYNAMODB_TABLE").unwrap_or_else(|_| "tollgate".to_owned());
    let store = tollgate::store::DynamoStore::from_env(&table, None).await;
    if store.check_table().await.is_err() {
        store.create_table().await?;
        println!("  created DynamoDB table {table}");
    }
    println!("  store:   DynamoDB table {table} (TOLLGATE_STORE=dynamodb)");
    Ok(std::sync::Arc::new(store))
}

#[cfg(not(feature = "dynamodb"))]
async fn dynamodb_store() -> Result<std::sync::Arc<dyn tollgate::store::Store>, Box<dyn std::error::Error>> {
    Err("TOLLGATE_STORE=dynamodb needs the cargo feature: cargo run --features dynamodb --example quickstart".into())
}

#[cfg(feature = "postgres")]
async fn postgres_store() -> Result<std::sync::Arc<dyn tollgate::store::Store>, Box<dyn std::error::Error>> {
    let settings = tollgate::config::PostgresSettings::default();
    let store = tollgate::store::PostgresStore::open(&tollgate::store::PostgresStore::options_of(&settings)?).await?;
    println!("  store:   PostgreSQL schema {} (TOLLGATE_STORE=postgres, DATABASE_URL)", store.schema());
    Ok(std::sync::Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_store() -> Result<std::sync::Arc<dyn tollgate::store::Store>, Box<dyn std::error::Error>> {
    Err("TOLLGATE_STORE=postgres needs the cargo feature: cargo run --features postgres --example quickstart".into())
}

#[cfg(feature = "redis")]
async fn redis_roles(builder: tollgate::Builder) -> Result<tollgate::Builder, Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").map_err(|_| "TOLLGATE_STORE=redis needs REDIS_URL (redis://host:6379)")?;
    let store = std::sync::Arc::new(
        tollgate::store::RedisStore::open(&url, "tollgate", std::time::Duration::from_secs(5)).await?,
    );
    Ok(builder
        .quota_store(store.clone())
        .rate_store(store.clone())
        .places_store(store.clone())
        .idempotency_store(store))
}

#[cfg(not(feature = "redis"))]
async fn redis_roles(_: tollgate::Builder) -> Result<tollgate::Builder, Box<dyn std::error::Error>> {
    Err("TOLLGATE_STORE=redis needs the cargo feature: cargo run --features redis --example quickstart".into())
}

/// The body of a call of a tenant's own route, up to `max` bytes (one more: the route answers
/// 413).
async fn bounded(body: axum::body::Body, max: usize) -> bytes::Bytes {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, max + 1).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => bytes::Bytes::from(vec![0; max + 1]),
    }
}

/// `GET`, `PUT {"limit": "25.00"}` or `DELETE` the calling tenant's own spend cap (403 on a
/// plan without one).
async fn spend_cap(
    Extension(ctx): Extension<TenantContext>,
    Extension(tollgate): Extension<Tollgate>,
    request: axum::extract::Request,
) -> axum::response::Response {
    // Who calls: the key's scopes say what it may do here.
    let caller = tollgate.caller(&request);
    let method = request.method().clone();
    let body = bounded(request.into_body(), tollgate::door::SPEND_CAP_MAX_BODY).await;
    tollgate.tenant_spend_cap(&ctx, &caller, &method, &body).await.map(axum::body::Body::from)
}

/// `GET`, `PUT {"url": "https://…"}` or `DELETE` the calling tenant's own alert endpoint (403
/// on a plan without `tenant_alerts`).
async fn alert_endpoint(
    Extension(ctx): Extension<TenantContext>,
    Extension(tollgate): Extension<Tollgate>,
    request: axum::extract::Request,
) -> axum::response::Response {
    // Who calls: the key's scopes say what it may do here.
    let caller = tollgate.caller(&request);
    let method = request.method().clone();
    let body = bounded(request.into_body(), tollgate::door::ALERT_ENDPOINT_MAX_BODY).await;
    tollgate.tenant_alert_endpoint(&ctx, &caller, &method, &body).await.map(axum::body::Body::from)
}

/// `GET`, `PUT {"below": 200, "to": 1000, "monthly_limit": "50.00"}` or `DELETE` the calling
/// tenant's own auto-recharge (403 unless its plan's recharge has `tenant_may_set = true` and
/// its key the scope `recharge:write`).
async fn recharge(
    Extension(ctx): Extension<TenantContext>,
    Extension(tollgate): Extension<Tollgate>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let caller = tollgate.caller(&request);
    let method = request.method().clone();
    let body = bounded(request.into_body(), tollgate::door::RECHARGE_MAX_BODY).await;
    tollgate.tenant_recharge(&ctx, &caller, &method, &body).await.map(axum::body::Body::from)
}

async fn items(Extension(ctx): Extension<TenantContext>) -> Json<Value> {
    Json(json!({ "tenant": ctx.tenant(), "plan": ctx.plan(), "items": ["apple", "pear"] }))
}

/// Costs 5 request units (a route rule) and reports the tokens it "generated".
async fn generate(Extension(ctx): Extension<TenantContext>) -> Json<Value> {
    let tokens = 120;
    ctx.record("tokens", tokens).expect("the tokens meter is declared");
    Json(json!({ "tenant": ctx.tenant(), "tokens": tokens, "text": "lorem ipsum" }))
}

/// A generation that takes about two seconds, for trying a plan's `concurrency`: its place is
/// held until it answers.
async fn generate_slow(Extension(ctx): Extension<TenantContext>) -> Json<Value> {
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let tokens = 120;
    ctx.record("tokens", tokens).expect("the tokens meter is declared");
    Json(json!({ "tenant": ctx.tenant(), "tokens": tokens, "text": "lorem ipsum, slowly" }))
}

/// Holds the request's `x-max-tokens` (a route rule) and records the 40 tokens it
/// "generated" through the hold; a record past the hold is refused (`overrun = "refuse"`).
async fn complete(Extension(ctx): Extension<TenantContext>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let tokens = 40;
    match ctx.record("tokens", tokens) {
        Ok(()) => Json(json!({ "tenant": ctx.tenant(), "tokens": tokens, "text": "lorem ipsum" })).into_response(),
        // The hold (and the balance) does not cover the work: nothing is generated, and the
        // refusal is tollgate's (402 for the balance), so the request is not billed either.
        Err(e) => match ctx.refusal("tokens", &e) {
            Some(refusal) => {
                tollgate::response::respond(&tollgate::response::ProblemJson, refusal).map(axum::body::Body::from)
            }
            None => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        },
    }
}

/// Puts the connection's peer in the request as tollgate's client address.
async fn client_addr(mut request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    if let Some(peer) = request.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0) {
        request.extensions_mut().insert(tollgate::door::ClientAddr(peer.ip()));
    }
    next.run(request).await
}

/// SIGTERM (how containers and systemd stop a service) or Ctrl-C: the server stops taking
/// requests, then the engine flushes (tollgate-axum offers this as `shutdown_signal`).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
