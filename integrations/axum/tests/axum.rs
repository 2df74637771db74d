//! tollgate behind axum: the conformance table (tests/conformance) against the bare tower
//! layer, the extractor, rejections as responses, the client address, the Stripe webhook route.
#![allow(missing_docs)]

#[path = "../examples/ai_stream.rs"]
mod ai_stream;
#[allow(dead_code)]
#[path = "../examples/axum.rs"]
mod axum_example;
#[path = "../../../tests/conformance/mod.rs"]
mod conformance;

use axum::{body::Body, response::IntoResponse, routing::get, Router};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate::door::Admission;
use tollgate::door::Credential;
use tollgate::door::RequestInfo;
use tollgate::{clock::Clock, Tollgate, TollgateLayer};
use tollgate_axum::{RejectionResponse, Tenant};
use tower::ServiceExt;

/// 2026-03-14T12:00:00Z
const NOON: i64 = 1_773_489_600;

const CONFIG: &str = r#"
[meters.tokens]
[plans.free]
quotas.requests = { limit = 3, period = "day", mode = "hard" }
quotas.tokens = { limit = 1000, period = "day", mode = "soft" }
[tenants.acme]
plan = "free"
keys = ["key-acme"]
"#;

fn engine() -> Tollgate {
    engine_and_clock().0
}

fn engine_and_clock() -> (Tollgate, tollgate::clock::FakeClock) {
    let (clock, fake) = Clock::fake_at_unix(NOON);
    (Tollgate::builder(tollgate::Config::from_toml_str(CONFIG).unwrap()).clock(clock).build().0, fake)
}

async fn generate(tenant: Tenant) -> String {
    tenant.record("tokens", 250).unwrap();
    let tokens = tenant.quota("tokens").unwrap();
    let requests = tenant.quota("requests").unwrap();
    format!(
        "{} on {}: {} requests and {} of {} tokens left",
        tenant.tenant(),
        tenant.plan(),
        requests.remaining,
        tokens.remaining,
        tokens.limit
    )
}

async fn who(tenant: Option<Tenant>) -> String {
    tenant.map_or_else(|| "nobody".to_owned(), |t| t.tenant().to_string())
}

fn get_req(path: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().uri(path);
    if let Some(key) = key {
        b = b.header("x-api-key", key);
    }
    b.body(Body::empty()).unwrap()
}

async fn text(r: axum::response::Response) -> (StatusCode, http::HeaderMap, String) {
    let (parts, body) = r.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn the_extractor_gives_the_tenant_its_quota_and_records_usage() {
    let (engine, clock) = engine_and_clock();
    let app = Router::new().route("/generate", get(generate)).layer(TollgateLayer::new(engine.clone()));
    let (status, headers, body) =
        text(app.clone().oneshot(get_req("/generate", Some("key-acme"))).await.unwrap()).await;
    assert_eq!(status, 200);
    // The request itself is charged before the handler runs: 2 of 3 left; 250 tokens recorded.
    assert_eq!(body, "acme on free: 2 requests and 750 of 1000 tokens left");
    assert!(headers.contains_key("ratelimit"), "{headers:?}");
    let (_, _, body) = text(app.clone().oneshot(get_req("/generate", Some("key-acme"))).await.unwrap()).await;
    assert_eq!(body, "acme on free: 1 requests and 500 of 1000 tokens left");
    let report = engine.flush().await.unwrap();
    assert_eq!(report.units, 2 + 500, "requests and tokens reached the store");
    // The next day: a new period of the request quota, nothing of the last one carried over
    // (tokens recorded outside a lease are owed to their own day: tests/reports.rs).
    clock.advance(std::time::Duration::from_secs(86_400));
    let (_, _, body) = text(app.clone().oneshot(get_req("/generate", Some("key-acme"))).await.unwrap()).await;
    assert!(body.starts_with("acme on free: 2 requests and "), "{body}");
    // Rejections come from the layer: problem+json, 401 without a key.
    let (status, headers, body) = text(app.oneshot(get_req("/generate", None)).await.unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(body.contains("\"status\":401"), "{body}");
}

#[tokio::test]
async fn without_the_layer_the_extractor_names_it_and_the_optional_one_is_none() {
    let app = Router::new().route("/generate", get(generate)).route("/who", get(who));
    let (status, headers, body) =
        text(app.clone().oneshot(get_req("/generate", Some("key-acme"))).await.unwrap()).await;
    assert_eq!(status, 500);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(body.contains("TollgateLayer"), "{body}");
    let (status, _, body) = text(app.clone().oneshot(get_req("/who", None)).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "nobody"));
    // Behind the layer, the optional form has the tenant.
    let layered = app.layer(TollgateLayer::new(engine()));
    let (status, _, body) = text(layered.oneshot(get_req("/who", Some("key-acme"))).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "acme"));
}

/// The layer's response and `RejectionResponse` for the same refusal: the same status, every
/// header, the same body, the rejection in the extensions. A 429 (quota spent) and a 401 (no
/// key: `WWW-Authenticate`).
#[tokio::test]
async fn a_rejection_responds_as_the_layer_does() {
    let engine = engine();
    let layered = Router::new().route("/", get(|| async { "ok" })).layer(TollgateLayer::new(engine.clone()));
    for _ in 0..3 {
        assert_eq!(layered.clone().oneshot(get_req("/", Some("key-acme"))).await.unwrap().status(), 200);
    }
    let mut door = engine.front_door();
    for (key, status) in [(Some("key-acme"), 429), (None, 401)] {
        let by_layer = layered.clone().oneshot(get_req("/", key)).await.unwrap();
        assert!(by_layer.extensions().get::<tollgate::Rejection>().is_some());
        let (layer_status, layer_headers, layer_body) = text(by_layer).await;
        assert_eq!(layer_status, status);
        // The same refusal, decided by a handler of its own through the engine's front door.
        let credential = key.map_or(Credential::Missing, |k| Credential::ApiKey(k.as_bytes()));
        let Admission::Rejected(rejection) = door.admit_with(|_| RequestInfo::new("GET", "/", credential)) else {
            panic!("expected a rejection")
        };
        let own = RejectionResponse::from(rejection).into_response();
        assert!(own.extensions().get::<tollgate::Rejection>().is_some());
        let (own_status, own_headers, own_body) = text(own).await;
        assert_eq!((own_status, own_body), (layer_status, layer_body));
        let mut own_headers = own_headers;
        own_headers.remove("content-length");
        let mut layer_headers = layer_headers;
        layer_headers.remove("content-length");
        assert_eq!(own_headers, layer_headers, "every header");
        if status == 401 {
            assert!(own_headers.contains_key("www-authenticate"));
        } else {
            assert!(own_headers.contains_key("retry-after") && own_headers.contains_key("ratelimit"));
        }
    }
}

#[cfg(feature = "stripe")]
#[tokio::test]
async fn the_webhook_route_verifies_and_moves_the_plan() {
    use tollgate::{
        billing::Secret,
        store::{prelude::*, MemoryStore, TenantRecord},
    };
    let config = format!("{CONFIG}[plans.metered]\n[stripe.events]\n\"payment_method.attached\" = \"metered\"\n");
    let store = std::sync::Arc::new(MemoryStore::new());
    store.put_tenant(&TenantRecord::new("beta".into(), "free".into()).with_customer("cus_beta"), &[]).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (engine, _worker) =
        Tollgate::builder(tollgate::Config::from_toml_str(&config).unwrap()).store_arc(store.clone()).build();
    let handler = engine.webhook_handler_with_secrets(vec![Secret::new("whsec_test")]);
    let app: Router = Router::new().route("/stripe/webhook", tollgate_axum::stripe_webhook(handler));
    let payload = format!(
        r#"{{"id":"evt_1","object":"event","type":"payment_method.attached","created":{now},"data":{{"object":{{"object":"payment_method","customer":"cus_beta"}}}}}}"#
    );
    let post = |signature: String| {
        Request::post("/stripe/webhook")
            .header("stripe-signature", signature)
            .body(Body::from(payload.clone()))
            .unwrap()
    };
    let bad = stripe_webhook::Webhook::generate_test_header(&payload, "whsec_other", Some(now));
    let (status, headers, _) = text(app.clone().oneshot(post(bad)).await.unwrap()).await;
    assert_eq!((status.as_u16(), headers["content-type"].to_str().unwrap()), (400, "application/problem+json"));
    assert_eq!(store.tenant(&"beta".into()).await.unwrap().unwrap().plan.as_str(), "free");
    let good = stripe_webhook::Webhook::generate_test_header(&payload, "whsec_test", Some(now));
    let (status, _, body) = text(app.oneshot(post(good)).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, r#"{"outcome":"applied","received":true}"#));
    assert_eq!(store.tenant(&"beta".into()).await.unwrap().unwrap().plan.as_str(), "metered");
}

/// The conformance application, the axum way: extractors, `IntoResponse`, a streaming body.
fn conformance_app(engine: Tollgate) -> Router {
    use axum::routing::post;
    use conformance::{ENTERED, GENERATE_TOKENS, RELEASE, STREAM_TOKENS};
    fn text(status: u16, body: &'static str) -> axum::response::Response {
        (StatusCode::from_u16(status).unwrap(), [(http::header::CONTENT_TYPE, "text/plain")], body).into_response()
    }
    let api = Router::new()
        .route("/v1/items", get(|| async { text(200, "items") }))
        .route("/v1/reports", post(|| async { text(200, "report") }))
        .route("/v1/fail", get(|| async { text(500, "fail") }))
        .route(
            "/v1/generate",
            post(|tenant: Tenant| async move {
                tenant.record("tokens", GENERATE_TOKENS).unwrap();
                text(200, "generated")
            }),
        )
        .route(
            "/v1/stream",
            get(|tenant: Tenant| async move {
                let chunks = futures_util::stream::unfold(0u8, move |sent| {
                    let tenant = tenant.clone();
                    async move {
                        match sent {
                            0 => Some((Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b"a")), 1)),
                            1 => {
                                tenant.record("tokens", STREAM_TOKENS).unwrap();
                                Some((Ok(bytes::Bytes::from_static(b"b")), 2))
                            }
                            _ => None,
                        }
                    }
                });
                ([(http::header::CONTENT_TYPE, "text/plain")], Body::from_stream(chunks)).into_response()
            }),
        )
        .route("/v1/orders", post(|| async { text(201, "created") }))
        .route(
            "/v1/complete",
            post(|| async {
                (
                    [
                        (http::header::CONTENT_TYPE, "text/plain".to_owned()),
                        (http::HeaderName::from_static("x-usage-tokens"), conformance::COMPLETE_TOKENS.to_string()),
                    ],
                    "completed",
                )
                    .into_response()
            }),
        )
        .route("/v1/draw", post(|| async { text(200, "drawn") }))
        .route(
            "/v1/echo",
            post(|body: bytes::Bytes| async move {
                let (call, text) = conformance::echo(&body);
                (
                    [
                        (http::header::CONTENT_TYPE, "text/plain".to_owned()),
                        (http::HeaderName::from_static("x-call"), call),
                    ],
                    text,
                )
                    .into_response()
            }),
        )
        .route(
            "/v1/slow",
            post(|| async {
                ENTERED.notify_one();
                RELEASE.notified().await;
                text(201, "created")
            }),
        )
        .layer(TollgateLayer::new(engine.clone()))
        // Outside the layer: it charges nothing.
        .route("/v1/usage", tollgate_axum::usage(engine.clone()));
    #[cfg(feature = "stripe")]
    let api = api.route("/stripe/webhook", tollgate_axum::stripe_webhook(conformance::webhooks(&engine)));
    api
}

struct Axum {
    app: Router,
}

impl conformance::Door for Axum {
    async fn send(&self, req: conformance::Req) -> conformance::Resp {
        let mut builder = Request::builder().method(req.method).uri(req.path);
        for (name, value) in &req.headers {
            builder = builder.header(*name, value.as_str());
        }
        let response = self.app.clone().oneshot(builder.body(Body::from(req.body)).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        conformance::Resp::new(
            parts.status.as_u16(),
            parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
            body.to_vec(),
        )
    }
}

#[tokio::test]
async fn axum_answers_the_conformance_table_as_the_tower_layer_does() {
    conformance::assert_same(conformance::Tower::new, |engine| Axum { app: conformance_app(engine) }).await;
}

#[tokio::test]
async fn the_client_address_middleware_copies_the_peer_address() {
    use std::net::SocketAddr;
    let app = Router::new()
        .route(
            "/addr",
            get(|addr: Option<axum::Extension<tollgate::door::ClientAddr>>| async move {
                addr.map_or_else(|| "none".to_owned(), |a| a.0 .0.to_string())
            }),
        )
        .layer(TollgateLayer::new(engine()))
        .layer(axum::middleware::from_fn(tollgate_axum::client_addr));
    let mut request = get_req("/addr", Some("key-acme"));
    request.extensions_mut().insert(axum::extract::ConnectInfo("198.51.100.4:5000".parse::<SocketAddr>().unwrap()));
    let (status, _, body) = text(app.clone().oneshot(request).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "198.51.100.4"));
    let (_, _, body) = text(app.oneshot(get_req("/addr", Some("key-acme"))).await.unwrap()).await;
    assert_eq!(body, "none");
}

tollgate::feature!(Sso = "sso");

/// `RequireFeature`: the tenant when the plan includes the feature, else the engine's 403
/// problem+json naming it; 500 without the layer.
#[tokio::test]
async fn the_feature_extractor_refuses_plans_without_the_feature() {
    let config = r#"
[plans.free]
[plans.pro]
features = ["sso"]
[tenants.acme]
plan = "free"
keys = ["key-acme"]
[tenants.big]
plan = "pro"
keys = ["key-big"]
"#;
    let engine = Tollgate::builder(tollgate::Config::from_toml_str(config).unwrap()).build().0;
    let route = Router::new().route(
        "/sso",
        get(|tenant: tollgate_axum::RequireFeature<Sso>| async move { format!("sso for {}", tenant.tenant()) }),
    );
    let app = route.clone().layer(TollgateLayer::new(engine.clone()));
    let (status, _, body) = text(app.clone().oneshot(get_req("/sso", Some("key-big"))).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "sso for big"));
    let (status, headers, body) = text(app.oneshot(get_req("/sso", Some("key-acme"))).await.unwrap()).await;
    assert_eq!(status, 403);
    assert_eq!(headers["content-type"], "application/problem+json");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["title"], "Feature not in plan");
    assert!(body["detail"].as_str().unwrap().contains("`sso`"), "{body}");
    // The refused request is not billed; the admitted one is.
    engine.flush().await.unwrap();
    let billed = |t: &'static str| {
        let engine = engine.clone();
        async move {
            engine
                .usage_store()
                .usage_range(&t.into(), 0, i64::MAX)
                .await
                .unwrap()
                .iter()
                .map(|a| a.quantity)
                .sum::<u64>()
        }
    };
    assert_eq!((billed("acme").await, billed("big").await), (0, 1));
    let (status, _, _) = text(route.oneshot(get_req("/sso", Some("key-big"))).await.unwrap()).await;
    assert_eq!(status, 500);
}

/// `shutdown_signal` resolves on SIGTERM, the signal containers, systemd and Kubernetes stop a
/// service with (the process's default action would end it before the last flush).
#[cfg(unix)]
#[tokio::test]
async fn shutdown_signal_resolves_on_sigterm() {
    let stop = tokio::spawn(tollgate_axum::shutdown_signal());
    // Its handler is installed on its first poll.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!stop.is_finished());
    let sent = std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
    assert!(sent.success());
    tokio::time::timeout(std::time::Duration::from_secs(5), stop).await.expect("resolved on SIGTERM").unwrap();
}

/// The AI example: a completion holds its `max_tokens` from the prepaid balance before the
/// model runs and bills each streamed token; when the balance cannot cover a request whole, it
/// streams what the balance allows and is stopped by a refused extension; an empty balance
/// refuses the next one before any work (402). What is billed is exactly what was streamed.
#[tokio::test]
async fn the_ai_example_bills_exactly_what_it_streamed_and_stops_at_the_balance() {
    use tower::ServiceExt;
    let config = tollgate::Config::from_toml_str(ai_stream::CONFIG).unwrap();
    let (engine, _worker) = Tollgate::builder(config).open().await.unwrap();
    tollgate::admin::Admin::for_engine(&engine).grant_credits("acme", "tokens", 100, None, "g-1").await.unwrap();
    let complete = |max_tokens: u64| {
        Request::post("/v1/completions")
            .header("x-api-key", "tg_prepaid_acme")
            .header("content-type", "application/json")
            .body(Body::from(format!("{{\"prompt\": \"once upon a time\", \"max_tokens\": {max_tokens}}}")))
            .unwrap()
    };
    let stream = |body: &str| -> (usize, Option<String>) {
        let tokens = body.split("\n\n").filter(|e| e.starts_with("data: ")).count();
        let end = body
            .split("\n\n")
            .find_map(|e| e.strip_prefix("event: ").map(|e| e.split('\n').next().unwrap().to_owned()));
        (tokens, end)
    };
    let app = ai_stream::app(engine.clone());
    let response = app.clone().oneshot(complete(60)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(stream(&body), (60, Some("done".to_owned())), "{body}");
    // 40 left: more than the balance is asked, so the stream holds a chunk at a time and stops.
    let response = app.clone().oneshot(complete(60)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(stream(&body), (40, Some("stopped".to_owned())), "{body}");
    let response = app.clone().oneshot(complete(10)).await.unwrap();
    assert_eq!(response.status(), 402, "nothing left: refused before the model runs");
    let now = engine.clock().unix_secs();
    let report = engine.usage_report(&"acme".into(), now - 3600, now + 3600).await.unwrap();
    let billed: u64 = report.usage.iter().filter(|w| w.meter.as_str() == "tokens").map(|w| w.quantity).sum();
    assert_eq!(billed, 100, "exactly what was streamed");
    engine.shutdown().await.unwrap();
    let (_, balances) = tollgate::admin::Admin::for_engine(&engine).credits("acme").await.unwrap();
    let b = balances.into_iter().find(|(m, _)| m.as_str() == "tokens").map(|(_, b)| b).unwrap();
    assert_eq!((b.granted, b.reserved), (100, 100));
}

/// The tenants' alert endpoint route behind the layer: the calling tenant registers its own
/// endpoint; a plan without `tenant_alerts` gets 403, a URL that is not https or resolves to a
/// private address 422, a body that is not the JSON 400, all problem+json, nothing stored.
#[cfg(feature = "alerts")]
#[tokio::test]
async fn tenants_register_their_alert_endpoint_through_the_route() {
    use tollgate::store::{DirectoryStore, MemoryStore};
    let config = tollgate::Config::from_toml_str(
        "[alerts]\nallow_private = [\"127.0.0.1/32\"]\n[plans.pro]\nrate = \"100/s\"\ntenant_alerts = true\n\
         [plans.free]\nrate = \"100/s\"\n",
    )
    .unwrap();
    let store = std::sync::Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).build();
    let admin = tollgate::admin::Admin::for_engine(&engine);
    admin.add_tenant("acme", "pro", None).await.unwrap();
    admin.add_tenant("bob", "free", None).await.unwrap();
    let acme = admin.issue_key("acme", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let bob = admin.issue_key("bob", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let app = Router::new()
        .route("/v1/alerts/endpoint", tollgate_axum::alert_endpoint(engine.clone()))
        .layer(TollgateLayer::new(engine));
    let call = |method: &str, key: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri("/v1/alerts/endpoint")
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let send = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await.unwrap();
            let status = response.status();
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, content_type, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
        }
    };
    let problem = |(status, ct, _): &(StatusCode, Option<String>, serde_json::Value), want: StatusCode| {
        assert_eq!(*status, want);
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
    };
    problem(&send(call("PUT", &bob, r#"{"url":"https://hooks.example.com/x"}"#)).await, StatusCode::FORBIDDEN);
    for bad in ["http://hooks.example.com/x", "https://10.0.0.7/x", "https://169.254.169.254/latest", "nope"] {
        let got = send(call("PUT", &acme, &format!(r#"{{"url":"{bad}"}}"#))).await;
        problem(&got, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(got.2["detail"].as_str().is_some(), "{got:?}");
    }
    problem(&send(call("PUT", &acme, "not json")).await, StatusCode::BAD_REQUEST);
    problem(&send(call("PUT", &acme, &"x".repeat(5_000))).await, StatusCode::PAYLOAD_TOO_LARGE);
    problem(&send(call("GET", &acme, "")).await, StatusCode::NOT_FOUND);
    assert_eq!(store.tenant(&"acme".into()).await.unwrap().unwrap().alert_endpoint, None, "nothing stored");
    let (status, _, body) = send(call("PUT", &acme, r#"{"url":"http://127.0.0.1:9/hook"}"#)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["secret"].as_str().unwrap().starts_with("whsec_"));
    let (status, _, body) = send(call("GET", &acme, "")).await;
    assert_eq!((status, body["url"].as_str()), (StatusCode::OK, Some("http://127.0.0.1:9/hook")));
    assert!(body.get("secret").is_none(), "the secret is shown once");
    let (status, _, _) = send(call("DELETE", &acme, "")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(store.tenant(&"acme".into()).await.unwrap().unwrap().alert_endpoint, None);
}

/// A tenant of the configuration file is known, though the file keeps no endpoint: its route
/// answers what it is (403 on a plan without tenant alerts, 409 `file-tenant` on one with
/// them, 404 `no-alert-endpoint` to a read), never "unknown tenant", and stores nothing.
#[cfg(feature = "alerts")]
#[tokio::test]
async fn a_tenant_of_the_file_is_told_why_it_registers_no_endpoint() {
    use tollgate::store::{DirectoryStore, MemoryStore};
    let config = tollgate::Config::from_toml_str(
        "[plans.pro]\nrate = \"100/s\"\ntenant_alerts = true\n[plans.free]\nrate = \"100/s\"\n\
         [tenants.acme]\nplan = \"pro\"\nkeys = [\"key-acme\"]\n[tenants.bob]\nplan = \"free\"\nkeys = [\"key-bob\"]\n",
    )
    .unwrap();
    let store = std::sync::Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).build();
    let app = Router::new()
        .route("/v1/alerts/endpoint", tollgate_axum::alert_endpoint(engine.clone()))
        .layer(TollgateLayer::new(engine));
    let send = |method: &str, key: &str, body: &str| {
        let req = Request::builder()
            .method(method)
            .uri("/v1/alerts/endpoint")
            .header("x-api-key", key)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
        }
    };
    let put = r#"{"url":"https://hooks.example.com/x"}"#;
    let (status, body) = send("PUT", "key-bob", put).await;
    assert_eq!(
        (status, body["type"].as_str()),
        (StatusCode::FORBIDDEN, Some("https://tollgate.rs/problems/alerts-not-on-plan")),
        "{body}"
    );
    let (status, body) = send("PUT", "key-acme", put).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["type"], "https://tollgate.rs/problems/file-tenant", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("[alerts]"), "{body}");
    let (status, body) = send("GET", "key-acme", "").await;
    assert_eq!(
        (status, body["type"].as_str()),
        (StatusCode::NOT_FOUND, Some("https://tollgate.rs/problems/no-alert-endpoint")),
        "{body}"
    );
    assert_eq!(send("DELETE", "key-acme", "").await.0, StatusCode::NO_CONTENT);
    assert!(store.tenant(&"acme".into()).await.unwrap().is_none(), "nothing stored");

    // An endpoint its directory record kept from before it was declared in the file is still
    // delivered to: the tenant sees it, and removes it.
    store.put_tenant(&tollgate::store::TenantRecord::new("acme".into(), "pro".into()), &[]).await.unwrap();
    let kept = r#"{"url":"https://hooks.example.com/old","secrets":["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}"#;
    let update = tollgate::store::TenantUpdate::AlertEndpoint("acme".into(), Some(kept.to_owned()));
    assert!(store.update_tenant(&update, tollgate::store::UpdateWhen::Always).await.unwrap());
    let (status, body) = send("GET", "key-acme", "").await;
    assert_eq!((status, body["url"].as_str()), (StatusCode::OK, Some("https://hooks.example.com/old")), "{body}");
    assert_eq!(send("PUT", "key-acme", put).await.0, StatusCode::CONFLICT, "not replaced");
    assert_eq!(send("DELETE", "key-acme", "").await.0, StatusCode::NO_CONTENT);
    assert_eq!(store.tenant(&"acme".into()).await.unwrap().unwrap().alert_endpoint, None, "removed");
}

/// The tenants' spend cap route behind the layer: the calling tenant sets its own cap within
/// its plan's `max_limit`; above it 422, not an amount 400, a plan without a cap 403, all
/// problem+json, nothing stored; the cap then holds its requests (402).
#[tokio::test]
async fn tenants_set_their_own_spend_cap_through_the_route() {
    use tollgate::store::MemoryStore;
    let config = tollgate::Config::from_toml_str(
        "[billing]\ncurrency = \"usd\"\n[meters.requests]\nprice = \"0.10\"\n[meters.account]\n\
         [plans.pro]\nspend = { limit = \"1.00\", max_limit = \"5.00\" }\n[plans.free]\nrate = \"100/s\"\n\
         [[routes]]\npath = \"/v1/spend/cap\"\nmeter = \"account\"\n",
    )
    .unwrap();
    let store = std::sync::Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).build();
    let admin = tollgate::admin::Admin::for_engine(&engine);
    admin.add_tenant("acme", "pro", None).await.unwrap();
    admin.add_tenant("bob", "free", None).await.unwrap();
    let acme = admin.issue_key("acme", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let bob = admin.issue_key("bob", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let app = Router::new()
        .route("/v1/spend/cap", tollgate_axum::spend_cap(engine.clone()))
        .route("/v1/work", axum::routing::get(|| async { "done" }))
        .layer(TollgateLayer::new(engine));
    let call = |method: &str, path: &str, key: &str, body: &str| {
        Request::builder().method(method).uri(path).header("x-api-key", key).body(Body::from(body.to_owned())).unwrap()
    };
    let send = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await.unwrap();
            let status = response.status();
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, content_type, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
        }
    };
    let problem = |(status, ct, _): &(StatusCode, Option<String>, serde_json::Value), want: StatusCode| {
        assert_eq!(*status, want);
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
    };
    problem(&send(call("PUT", "/v1/spend/cap", &bob, r#"{"limit":"1.00"}"#)).await, StatusCode::FORBIDDEN);
    problem(&send(call("PUT", "/v1/spend/cap", &acme, r#"{"limit":"5.01"}"#)).await, StatusCode::UNPROCESSABLE_ENTITY);
    problem(&send(call("PUT", "/v1/spend/cap", &acme, r#"{"limit":"lots"}"#)).await, StatusCode::BAD_REQUEST);
    problem(&send(call("PUT", "/v1/spend/cap", &acme, "not json")).await, StatusCode::BAD_REQUEST);
    problem(&send(call("PUT", "/v1/spend/cap", &acme, &"x".repeat(5_000))).await, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _, body) = send(call("GET", "/v1/spend/cap", &acme, "")).await;
    assert_eq!((status, body["limit"].as_str(), body["set_by"].as_str()), (StatusCode::OK, Some("1"), Some("plan")));
    // Lowered to 0.30: three requests at 0.10, then 402.
    let (status, _, body) = send(call("PUT", "/v1/spend/cap", &acme, r#"{"limit":"0.30","mode":"hard"}"#)).await;
    assert_eq!((status, body["limit"].as_str()), (StatusCode::OK, Some("0.3")), "{body}");
    for _ in 0..3 {
        assert_eq!(send(call("GET", "/v1/work", &acme, "")).await.0, StatusCode::OK);
    }
    let refused = send(call("GET", "/v1/work", &acme, "")).await;
    problem(&refused, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(refused.2["policy"], "spend-month");
    // At its cap, the tenant can still raise it: the route's meter is not priced.
    let (status, _, body) = send(call("PUT", "/v1/spend/cap", &acme, r#"{"limit":"0.40"}"#)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(send(call("GET", "/v1/work", &acme, "")).await.0, StatusCode::OK, "raised: seen at once on this node");
    assert_eq!(send(call("DELETE", "/v1/spend/cap", &acme, "")).await.0, StatusCode::NO_CONTENT);
}

/// The tenant's own recharge route, mounted behind the layer: GET answers the caller's
/// (off until it turns it on), PUT by a key without `recharge:write` 403, PUT outside the plan's bounds or not numbers is 422
/// problem+json and stores nothing, DELETE 204, a plan that recharges nothing 403. (Turning it
/// on reads the price from Stripe: the root crate's tests, against the stand-in.)
#[tokio::test]
async fn tenants_reach_their_own_recharge_through_the_route() {
    use tollgate::store::MemoryStore;
    let config = tollgate::Config::from_toml_str(
        "[billing]\ncurrency = \"usd\"\n[meters.account]\n\
         [plans.payg]\nquotas.requests = { period = \"prepaid\" }\n\
         [plans.payg.recharge.requests]\nprice = \"price_pack\"\nbelow = 300\nto = 1000\nmonthly_limit = \"50.00\"\ntenant_may_set = true\n\
         [plans.free]\nrate = \"100/s\"\n\
         [stripe]\n[stripe.credits]\nmeter = \"requests\"\nprices = { price_pack = 100 }\n\
         [[routes]]\npath = \"/v1/credits/recharge\"\nmeter = \"account\"\n",
    )
    .unwrap();
    let store = std::sync::Arc::new(MemoryStore::new());
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).build();
    let admin = tollgate::admin::Admin::for_engine(&engine);
    admin.add_tenant("acme", "payg", None).await.unwrap();
    admin.add_tenant("bob", "free", None).await.unwrap();
    let scopes = tollgate::store::KeyScopes::ALL;
    let acme = admin.issue_key("acme", tollgate::admin::KeyOptions::default().scopes(scopes)).await.unwrap().key;
    let plain = admin.issue_key("acme", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let bob = admin.issue_key("bob", tollgate::admin::KeyOptions::default()).await.unwrap().key;
    let app = Router::new()
        .route("/v1/credits/recharge", tollgate_axum::recharge(engine.clone()))
        .layer(TollgateLayer::new(engine));
    let call = |method: &str, key: &str, body: &str| {
        let req = Request::builder()
            .method(method)
            .uri("/v1/credits/recharge")
            .header("x-api-key", key)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await.unwrap();
            let status = response.status();
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, content_type, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
        }
    };
    let (status, _, body) = call("GET", &acme, "").await;
    assert_eq!(
        (status, body["on"].as_bool(), body["off_reason"].as_str()),
        (StatusCode::OK, Some(false), Some("not_turned_on"))
    );
    // A key without `recharge:write` (the default) reads it and turns nothing on.
    let (status, _, body) = call("PUT", &plain, "{}").await;
    assert_eq!(
        (status, body["type"].as_str()),
        (StatusCode::FORBIDDEN, Some("https://tollgate.rs/problems/scope-missing"))
    );
    assert_eq!(call("GET", &plain, "").await.0, StatusCode::OK);
    for bad in [r#"{"to": 1001}"#, r#"{"below": "lots"}"#, r#"{"monthly_limit": "99.00"}"#] {
        let (status, ct, _) = call("PUT", &acme, bad).await;
        assert_eq!(
            (status, ct.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("application/problem+json")),
            "{bad}"
        );
    }
    let (status, ct, _) = call("PUT", &acme, "").await;
    assert_eq!(
        (status, ct.as_deref()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("application/problem+json")),
        "no body"
    );
    assert_eq!(admin.recharge("acme", "requests").await.unwrap().state.setting, None, "nothing stored");
    let (status, ct, _) = call("GET", &bob, "").await;
    assert_eq!((status, ct.as_deref()), (StatusCode::FORBIDDEN, Some("application/problem+json")));
    assert_eq!(call("POST", &acme, "{}").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(call("DELETE", &acme, "").await.0, StatusCode::NO_CONTENT);
}

/// The dashboard's router merged beside a layered API: its pages under its path (with and
/// without the trailing slash), outside the layer, the token required.
#[cfg(feature = "dashboard")]
#[tokio::test]
async fn the_dashboard_router_serves_its_pages_under_its_path_outside_the_layer() {
    use tollgate::{
        config::DashboardToken,
        dashboard::{Access, Dashboard},
    };
    let engine = engine();
    let access = Access::Token(DashboardToken::new("dashboard-token-0123456789-abcdefgh").unwrap());
    let app = Router::new()
        .route("/v1/items", get(|| async { "items" }))
        .layer(TollgateLayer::new(engine.clone()))
        .merge(tollgate_axum::dashboard("/ops", Dashboard::for_engine(&engine, access)));
    let call = |uri: &str, auth: bool| {
        let mut r = Request::get(uri);
        if auth {
            r = r.header("authorization", "Bearer dashboard-token-0123456789-abcdefgh");
        }
        app.clone().oneshot(r.body(Body::empty()).unwrap())
    };
    assert_eq!(call("/ops/", false).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let old = call("/ops/?q=a", true).await.unwrap();
    let location = old.headers().get("location").and_then(|l| l.to_str().ok()).map(str::to_owned);
    assert_eq!((old.status(), location.as_deref()), (StatusCode::SEE_OTHER, Some("/ops/tenants?q=a")), "the old list");
    for uri in
        ["/ops", "/ops/", "/ops/billing", "/ops/alerts", "/ops/node", "/ops/tenants?q=a", "/ops/assets/dashboard.css"]
    {
        let resp = call(uri, true).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{uri}");
        let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(!body.contains("Missing credentials"), "{uri}: not behind the layer");
    }
    let page = call("/ops/", true).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&page).contains("href=\"/ops/billing\""), "links under its path");
    assert_eq!(call("/ops/tenants/nobody", true).await.unwrap().status(), StatusCode::NOT_FOUND);
    // The API is still behind the layer.
    assert_eq!(call("/v1/items", false).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // Nested in a router, its links start with the outer prefix too.
    let access = Access::Token(DashboardToken::new("dashboard-token-0123456789-abcdefgh").unwrap());
    let nested: Router =
        Router::new().nest("/admin", tollgate_axum::dashboard("/ops", Dashboard::for_engine(&engine, access)));
    let req = Request::get("/admin/ops/").header("authorization", "Bearer dashboard-token-0123456789-abcdefgh");
    let resp = nested.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let page = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&page).contains("href=\"/admin/ops/billing\""), "links under the nest");
}

/// The dashboard's router counts wrong tokens per client address from axum's `ConnectInfo`
/// (an application serving with `into_make_service_with_connect_info`): one address barred is
/// not every client barred.
#[cfg(feature = "dashboard")]
#[tokio::test]
async fn the_dashboard_router_limits_wrong_tokens_per_connected_address() {
    use axum::extract::ConnectInfo;
    use tollgate::{
        config::DashboardToken,
        dashboard::{Access, Dashboard, MAX_FAILED_TRIES},
    };
    let engine = engine();
    let access = Access::Token(DashboardToken::new("dashboard-token-0123456789-abcdefgh").unwrap());
    let app: Router = tollgate_axum::dashboard("/ops", Dashboard::for_engine(&engine, access));
    let call = |from: [u8; 4], token: &str| {
        let mut r =
            Request::get("/ops/").header("authorization", format!("Bearer {token}")).body(Body::empty()).unwrap();
        r.extensions_mut().insert(ConnectInfo(std::net::SocketAddr::from((from, 40_000))));
        app.clone().oneshot(r)
    };
    for _ in 0..MAX_FAILED_TRIES {
        assert_eq!(call([203, 0, 113, 9], "wrong-token-5f0c1a9e3b7d24c8a6e0f19b").await.unwrap().status(), 401);
    }
    let right = "dashboard-token-0123456789-abcdefgh";
    assert_eq!(call([203, 0, 113, 9], right).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    let mut served = false;
    for last in 1..=50 {
        served |= call([198, 51, 100, last], right).await.unwrap().status() == StatusCode::OK;
    }
    assert!(served, "other addresses are served");
}

/// The axum example (examples/axum.rs) mounts every route a tenant calls about itself: its
/// usage outside the layer (ten polls spend none of a burst of 5), its spend cap (read,
/// refused above the plan's maximum, lowered, then holding), its recharge and alert endpoint.
#[tokio::test]
async fn the_axum_example_mounts_every_route_a_tenant_calls_about_itself() {
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let config = tollgate::Config::from_toml_str(axum_example::CONFIG).unwrap();
    let (engine, _worker) = Tollgate::builder(config).clock(clock).build();
    let app = axum_example::app(engine);
    let send = |method: &str, path: &str, key: Option<&str>, body: &str| {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        let req = req.body(Body::from(body.to_owned())).unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await.unwrap();
            let status = response.status().as_u16();
            let limited = response.headers().contains_key("ratelimit");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, limited, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
        }
    };
    let (acme, umbrella) = (Some("tg_free_acme"), Some("tg_metered_umbrella"));
    for _ in 0..10 {
        let (status, limited, body) = send("GET", "/v1/usage", acme, "").await;
        assert_eq!((status, limited, body["tenant"].as_str()), (200, false, Some("acme")), "{body}");
    }
    for i in 0..5 {
        assert_eq!(send("GET", "/v1/items", acme, "").await.0, 200, "request {i} of the burst");
    }
    assert_eq!(send("GET", "/v1/items", acme, "").await.0, 429, "the burst is spent");
    assert_eq!(send("GET", "/v1/usage", None, "").await.0, 401);

    let (status, _, cap) = send("GET", "/v1/spend/cap", umbrella, "").await;
    assert_eq!((status, cap["limit"].as_str(), cap["max_limit"].as_str()), (200, Some("1"), Some("5")), "{cap}");
    assert_eq!(send("PUT", "/v1/spend/cap", umbrella, r#"{"limit": "6.00", "mode": "hard"}"#).await.0, 422);
    assert_eq!(send("PUT", "/v1/spend/cap", umbrella, r#"{"limit": "0.50", "mode": "hard"}"#).await.0, 200);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(send("POST", "/v1/generate", umbrella, "").await.0);
    }
    assert_eq!(statuses, [200, 200, 402], "$0.25 a generation under a cap of $0.50");

    fake.advance(std::time::Duration::from_secs(5));
    let (status, _, body) = send("GET", "/v1/credits/recharge", acme, "").await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = send("GET", "/v1/alerts/endpoint", acme, "").await;
    assert_eq!((status, body["type"].as_str()), (404, Some("https://tollgate.rs/problems/no-alert-endpoint")));
}
