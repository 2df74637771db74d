//! tollgate behind axum: the extractor, rejections as responses, the Stripe webhook route.
#![allow(missing_docs)]

use axum::{body::Body, response::IntoResponse, routing::get, Router};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate::{clock::Clock, Admission, Credential, RequestInfo, Tollgate, TollgateLayer};
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
    let (clock, _fake) = Clock::fake_at_unix(NOON);
    Tollgate::builder(tollgate::Config::from_toml_str(CONFIG).unwrap()).clock(clock).build().0
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
    let engine = engine();
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
    // Rejections come from the layer: problem+json, 401 without a key.
    let (status, headers, body) = text(app.oneshot(get_req("/generate", None)).await.unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(body.contains("\"status\":401"), "{body}");
}

#[tokio::test]
async fn without_the_layer_the_extractor_names_it_and_the_optional_one_is_none() {
    let app = Router::new().route("/generate", get(generate)).route("/who", get(who));
    let (status, _, body) = text(app.clone().oneshot(get_req("/generate", Some("key-acme"))).await.unwrap()).await;
    assert_eq!(status, 500);
    assert!(body.contains("TollgateLayer"), "{body}");
    let (status, _, body) = text(app.oneshot(get_req("/who", None)).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "nobody"));
}

#[tokio::test]
async fn a_rejection_responds_as_the_layer_does() {
    let engine = engine();
    let layered = Router::new().route("/", get(|| async { "ok" })).layer(TollgateLayer::new(engine.clone()));
    for _ in 0..3 {
        assert_eq!(layered.clone().oneshot(get_req("/", Some("key-acme"))).await.unwrap().status(), 200);
    }
    let (status, headers, body) = text(layered.oneshot(get_req("/", Some("key-acme"))).await.unwrap()).await;
    assert_eq!(status, 429);
    // The same refusal, decided by a handler of its own through the engine's front door.
    let mut door = engine.front_door();
    let admission = door.admit_with(|_| RequestInfo::new("GET", "/", Credential::ApiKey(b"key-acme")));
    let Admission::Rejected(rejection) = admission else { panic!("expected a rejection") };
    let (own_status, own_headers, own_body) = text(RejectionResponse::from(rejection).into_response()).await;
    assert_eq!((own_status, own_body), (status, body));
    for name in ["content-type", "retry-after", "ratelimit", "ratelimit-policy"] {
        assert_eq!(own_headers.get(name), headers.get(name), "{name}");
    }
}

#[cfg(feature = "stripe")]
#[tokio::test]
async fn the_webhook_route_verifies_and_moves_the_plan() {
    use tollgate::{
        billing::{Secret, WebhookHandler},
        store::{MemoryStore, Store, TenantRecord},
    };
    let config = format!("{CONFIG}[plans.metered]\n[stripe.events]\n\"payment_method.attached\" = \"metered\"\n");
    let store = std::sync::Arc::new(MemoryStore::new());
    store.put_tenant(&TenantRecord::new("beta".into(), "free".into()).with_customer("cus_beta"), &[]).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (engine, _worker) =
        Tollgate::builder(tollgate::Config::from_toml_str(&config).unwrap()).store_arc(store.clone()).build();
    let handler = WebhookHandler::new(engine.clone(), vec![Secret::new("whsec_test")]);
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
