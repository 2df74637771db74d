//! tollgate on AWS Lambda: the conformance table (tests/conformance) sent as API Gateway REST
//! (v1), HTTP API (v2) and function URL events, parsed by `lambda_http` and answered through
//! its own response conversion, compared with the bare tower layer; the client address from
//! the event; the flush after each invocation; the SnapStart hooks; the export entry point.
#![allow(missing_docs)]

#[path = "../../../tests/conformance/mod.rs"]
mod conformance;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use conformance::{Door, Req, Resp, Tower, NOON};
use lambda_http::{
    lambda_runtime::{Context, LambdaEvent, LambdaInvocation},
    request::LambdaRequest,
    Service,
};
use serde_json::{json, Value};
use tollgate::store::prelude::*;
use tollgate::{
    clock::Clock,
    config::Period,
    store::{MemoryStore, QuotaKey},
    Tollgate,
};
use tower::ServiceExt;

#[derive(Debug, Clone, Copy)]
enum Payload {
    /// API Gateway REST API (payload 1.0).
    Rest,
    /// API Gateway HTTP API (payload 2.0).
    Http,
    /// A Lambda function URL (payload 2.0, its own request context).
    FunctionUrl,
}

const SOURCE_IP: &str = "203.0.113.9";

/// The event API Gateway or the function URL would send for `req`. Repeated headers: REST
/// keeps them in `multiValueHeaders`; HTTP APIs and function URLs join them with commas.
fn event(kind: Payload, req: &Req) -> Value {
    let mut joined = BTreeMap::<String, String>::new();
    let mut multi = BTreeMap::<String, Vec<String>>::new();
    for (name, value) in &req.headers {
        joined.entry(name.to_string()).and_modify(|v| *v = format!("{v},{value}")).or_insert_with(|| value.clone());
        multi.entry(name.to_string()).or_default().push(value.clone());
    }
    let body = if req.body.is_empty() { Value::Null } else { json!(req.body) };
    let (path, query) = req.path.split_once('?').unwrap_or((req.path, ""));
    let mut params = serde_json::Map::new();
    let mut multi_params = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(k.to_owned(), json!(v));
        multi_params.insert(k.to_owned(), json!([v]));
    }
    let (params, multi_params) = if params.is_empty() {
        (Value::Null, Value::Null)
    } else {
        (Value::Object(params), Value::Object(multi_params))
    };
    match kind {
        // A REST API on its stage `prod`: `lambda_http` puts the stage in front of the path,
        // which the Lambda door takes off again.
        Payload::Rest => json!({
            "resource": "/{proxy+}",
            "path": path,
            "httpMethod": req.method,
            // API Gateway: the last value of each header in `headers`, all in `multiValueHeaders`.
            "headers": multi.iter().map(|(k, v)| (k.clone(), json!(v.last().unwrap()))).collect::<serde_json::Map<_, _>>(),
            "multiValueHeaders": multi,
            "queryStringParameters": params,
            "multiValueQueryStringParameters": multi_params,
            "pathParameters": { "proxy": path.trim_start_matches('/') },
            "stageVariables": null,
            "requestContext": {
                "resourceId": "abc123",
                "resourcePath": "/{proxy+}",
                "httpMethod": req.method,
                "path": format!("/prod{path}"),
                "accountId": "123456789012",
                "protocol": "HTTP/1.1",
                "stage": "prod",
                "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
                "requestTimeEpoch": NOON * 1000,
                "identity": { "sourceIp": SOURCE_IP, "userAgent": "conformance" },
                "apiId": "1234567890"
            },
            "body": body,
            "isBase64Encoded": false
        }),
        Payload::Http | Payload::FunctionUrl => {
            let domain = match kind {
                Payload::FunctionUrl => "abcdefghijklmnop.lambda-url.us-east-1.on.aws",
                _ => "1234567890.execute-api.us-east-1.amazonaws.com",
            };
            // An HTTP API on its named stage `prod` has the stage in `rawPath`; a function URL
            // has none.
            let (stage, raw_path) = match kind {
                Payload::Http => ("prod", format!("/prod{path}")),
                _ => ("$default", path.to_owned()),
            };
            json!({
                "version": "2.0",
                "routeKey": "$default",
                "rawPath": raw_path,
                "rawQueryString": query,
                "headers": joined,
                "requestContext": {
                    "accountId": "123456789012",
                    "apiId": domain.split('.').next().unwrap(),
                    "domainName": domain,
                    "domainPrefix": domain.split('.').next().unwrap(),
                    "http": {
                        "method": req.method,
                        "path": path,
                        "protocol": "HTTP/1.1",
                        "sourceIp": SOURCE_IP,
                        "userAgent": "conformance"
                    },
                    "requestId": "JKJaXmPLvHcESHA=",
                    "routeKey": "$default",
                    "stage": stage,
                    "time": "14/Mar/2026:12:00:00 +0000",
                    "timeEpoch": NOON * 1000
                },
                "body": body,
                "isBase64Encoded": false
            })
        }
    }
}

/// The Lambda door: the event parsed by `lambda_http`, served by `tollgate_lambda::service`
/// (or the webhook entry point), and the answer converted by `lambda_http` into the response
/// Lambda returns to API Gateway, read back.
struct Lambda {
    engine: Tollgate,
    kind: Payload,
}

async fn invoke<S, B, E>(service: S, payload: &Value) -> Resp
where
    S: tower::Service<lambda_http::Request, Response = http::Response<B>, Error = E> + Send + 'static,
    E: std::fmt::Debug + Into<lambda_http::lambda_runtime::Diagnostic> + Send + 'static,
    S::Future: Send + 'static,
    http::Response<B>: lambda_http::IntoResponse,
{
    let request: LambdaRequest = serde_json::from_value(payload.clone()).expect("an event lambda_http parses");
    let mut adapter = tollgate_lambda::adapter(service);
    let response = adapter.call(LambdaEvent::new(request, Context::default())).await.unwrap();
    let response = serde_json::to_value(&response).unwrap();
    let status = response["statusCode"].as_u64().unwrap() as u16;
    let mut headers = Vec::<(String, Vec<u8>)>::new();
    match response.get("multiValueHeaders").and_then(Value::as_object).filter(|m| !m.is_empty()) {
        Some(multi) => {
            for (name, values) in multi {
                for value in values.as_array().unwrap() {
                    headers.push((name.clone(), value.as_str().unwrap().as_bytes().to_vec()));
                }
            }
        }
        None => {
            for (name, value) in response["headers"].as_object().unwrap() {
                headers.push((name.clone(), value.as_str().unwrap().as_bytes().to_vec()));
            }
        }
    }
    assert_ne!(response["isBase64Encoded"], json!(true), "text bodies");
    let body = response["body"].as_str().unwrap_or_default().as_bytes().to_vec();
    Resp::new(status, headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())), body)
}

impl Door for Lambda {
    // lambda_http parses the event's path as a URL (the `url` crate), resolving `..` and
    // `%2E%2E` before the engine and the application see it.
    const RESOLVES_DOT_SEGMENTS: bool = true;

    async fn send(&self, req: Req) -> Resp {
        let payload = event(self.kind, &req);
        if req.path == "/v1/usage" {
            return invoke(tollgate_lambda::usage_handler(self.engine.clone()), &payload).await;
        }
        if req.path == "/stripe/webhook" {
            #[cfg(feature = "stripe")]
            return invoke(tollgate_lambda::webhook_handler(conformance::webhooks(&self.engine)), &payload).await;
        }
        invoke(tollgate_lambda::service(self.engine.clone(), tower::service_fn(conformance::app)), &payload).await
    }
}

#[tokio::test]
async fn rest_api_events_are_answered_as_the_tower_layer_answers() {
    conformance::assert_same(Tower::new, |engine| Lambda { engine, kind: Payload::Rest }).await;
}

#[tokio::test]
async fn http_api_events_are_answered_as_the_tower_layer_answers() {
    conformance::assert_same(Tower::new, |engine| Lambda { engine, kind: Payload::Http }).await;
}

#[tokio::test]
async fn function_url_events_are_answered_as_the_tower_layer_answers() {
    conformance::assert_same(Tower::new, |engine| Lambda { engine, kind: Payload::FunctionUrl }).await;
}

#[tokio::test]
async fn the_source_ip_of_every_payload_kind_is_the_client_address() {
    let (engine, _, _) = conformance::engine().await;
    let echo = tower::service_fn(|request: lambda_http::Request| async move {
        let addr = request.extensions().get::<tollgate::door::ClientAddr>().map(|a| a.0.to_string());
        Ok::<_, std::convert::Infallible>(http::Response::new(lambda_http::Body::from(format!("{addr:?}"))))
    });
    for kind in [Payload::Rest, Payload::Http, Payload::FunctionUrl] {
        let payload = event(kind, &Req::new("GET", "/v1/items").key("key-soft"));
        let resp = invoke(tollgate_lambda::service(engine.clone(), echo), &payload).await;
        assert_eq!((resp.status, resp.body.as_str()), (200, "Some(\"203.0.113.9\")"), "{kind:?}");
    }
}

const FLUSHING: &str = r#"
[usage]
flush_interval = "5s"
[plans.free]
quotas.requests = { limit = 100, period = "day", mode = "hard" }
[tenants.acme]
plan = "free"
keys = ["key-acme"]
"#;

fn day_key(tenant: &str) -> QuotaKey {
    let start = NOON - NOON.rem_euclid(86_400);
    QuotaKey::new(tenant.into(), "requests".into(), Period::Day, start, start + 86_400)
}

async fn committed(store: &MemoryStore) -> u64 {
    store.usage_range(&"acme".into(), 0, i64::MAX).await.unwrap().iter().map(|a| a.quantity).sum()
}

/// An engine on a memory store and a fake clock, and a request of acme admitted through the
/// Lambda service.
async fn flushing_engine() -> (Tollgate, tollgate::clock::FakeClock, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let config = tollgate::Config::from_toml_str(FLUSHING).unwrap();
    let (engine, _worker) = Tollgate::builder(config).store_arc(store.clone()).clock(clock).build();
    (engine, fake, store)
}

async fn one_request(engine: &Tollgate) -> u16 {
    let payload = event(Payload::Http, &Req::new("GET", "/v1/items").key("key-acme"));
    invoke(tollgate_lambda::service(engine.clone(), tower::service_fn(conformance::app)), &payload).await.status
}

/// An invocation as the Lambda runtime hands it to its layers.
fn invocation() -> LambdaInvocation {
    LambdaInvocation {
        parts: http::Response::new(()).into_parts().0,
        body: bytes::Bytes::from_static(b"{}"),
        context: Context::default(),
    }
}

#[tokio::test]
async fn after_each_invocation_usage_is_flushed_once_the_flush_interval_has_passed() {
    let (engine, clock, store) = flushing_engine().await;
    // The runtime's invocation service (which posts the response) stands in as one that
    // serves a request: the layer's flush runs after it returns, before the next event.
    let serve = engine.clone();
    let runtime_service = tower::service_fn(move |_: LambdaInvocation| {
        let engine = serve.clone();
        async move {
            assert_eq!(one_request(&engine).await, 200);
            Ok::<(), lambda_http::Error>(())
        }
    });
    let mut service = tower::Layer::layer(&tollgate_lambda::FlushLayer::new(engine.clone()), runtime_service);
    service.ready().await.unwrap().call(invocation()).await.unwrap();
    assert_eq!(committed(&store).await, 0, "not yet due: store traffic follows the flush interval");
    clock.advance(Duration::from_secs(2));
    service.ready().await.unwrap().call(invocation()).await.unwrap();
    assert_eq!(committed(&store).await, 0);
    clock.advance(Duration::from_secs(3));
    service.ready().await.unwrap().call(invocation()).await.unwrap();
    assert_eq!(committed(&store).await, 3, "due: the three requests are in the store when the invocation ends");
    service.ready().await.unwrap().call(invocation()).await.unwrap();
    assert_eq!(committed(&store).await, 3, "the next flush waits for the interval again");
    clock.advance(Duration::from_secs(5));
    let layer = tollgate_lambda::FlushLayer::new(engine.clone());
    clock.advance(Duration::from_secs(5));
    assert!(layer.flush_if_due().await);
    assert_eq!(committed(&store).await, 4);
}

#[tokio::test]
async fn the_shutdown_hook_flushes_and_gives_leases_back() {
    let (engine, _, store) = flushing_engine().await;
    assert_eq!(one_request(&engine).await, 200);
    assert!(store.reserved(&day_key("acme")).await.unwrap() > 1, "a lease is held");
    tollgate_lambda::shutdown(&engine).await;
    assert_eq!(committed(&store).await, 1);
    assert_eq!(store.reserved(&day_key("acme")).await.unwrap(), 1, "the lease went back: only the unit used");
}

#[tokio::test]
async fn snapstart_settles_before_the_snapshot_and_each_restored_copy_is_its_own() {
    use lambda_http::SnapStartResource;
    let (engine, clock, store) = flushing_engine().await;
    for _ in 0..3 {
        assert_eq!(one_request(&engine).await, 200);
    }
    let leased = store.reserved(&day_key("acme")).await.unwrap();
    assert!(leased > 3, "a lease is held: {leased}");
    let hooks = tollgate_lambda::SnapStart::new(engine.clone());
    hooks.before_snapshot().await.unwrap();
    // Nothing owed is left in the snapshot: all usage in the store, every lease back.
    assert_eq!(committed(&store).await, 3);
    assert_eq!(store.reserved(&day_key("acme")).await.unwrap(), 3);
    assert_eq!(engine.stats().tracked_tenants, 0, "no tenant state (with its lease) in the snapshot");
    // A restored copy draws its own node id; its usage flushes under new flush ids, so the
    // store takes it (a copy with the snapshot's id would be dropped as a duplicate by a
    // store that had seen that id).
    let node = engine.node_id();
    clock.advance(Duration::from_secs(3600));
    hooks.after_restore().await.unwrap();
    assert_ne!(engine.node_id(), node);
    let again = engine.node_id();
    hooks.after_restore().await.unwrap();
    assert_ne!(engine.node_id(), again, "every restore draws anew");
    assert_eq!(one_request(&engine).await, 200);
    engine.flush().await.unwrap();
    assert_eq!(committed(&store).await, 4);
}

#[tokio::test]
async fn the_export_entry_point_flushes_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("usage.jsonl");
    let store = Arc::new(MemoryStore::new());
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let config = tollgate::Config::from_toml_str(&format!("{FLUSHING}\n[meters.requests]\n")).unwrap();
    let (engine, _worker) = Tollgate::builder(config)
        .store_arc(store.clone())
        .clock(clock)
        .billing_sink(tollgate::billing::JsonlSink::new(&out))
        .build();
    assert_eq!(one_request(&engine).await, 200);
    assert_eq!(one_request(&engine).await, 200);
    // The window closes, and its grace passes.
    fake.advance(Duration::from_secs(2 * 3600));
    let event = LambdaEvent::new(json!({"source": "aws.events", "detail-type": "Scheduled Event"}), Context::default());
    let answer = tollgate_lambda::export_handler(engine).oneshot(event).await.unwrap();
    assert_eq!(answer["flushed_records"], 1, "{answer}");
    assert_eq!(answer["units"], 2, "{answer}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(written.lines().count(), 1, "{written}");
}

/// On-demand Lambda freezes the environment once the invocation returns: a keyed request's
/// settlement, made in the background after the response, must reach the store before that.
/// Another node of the fleet, asked at once (nothing here runs meanwhile), answers the key's
/// retry from the store: a replay, not a 409 and later a second run billed again.
#[tokio::test]
async fn an_idempotency_key_is_settled_before_the_invocation_ends() {
    let (engine, _clock, store) = flushing_engine().await;
    let keyed = Req::new("POST", "/v1/echo").key("key-acme").header("idempotency-key", "order-1").body("x".into());
    let payload = event(Payload::Http, &keyed);
    let serve = (engine.clone(), payload.clone());
    let runtime_service = tower::service_fn(move |_: LambdaInvocation| {
        let (engine, payload) = serve.clone();
        async move {
            let first = invoke(tollgate_lambda::service(engine, tower::service_fn(conformance::app)), &payload).await;
            assert_eq!(first.status, 200);
            Ok::<(), lambda_http::Error>(())
        }
    });
    let mut service = tower::Layer::layer(&tollgate_lambda::FlushLayer::new(engine.clone()), runtime_service);
    service.ready().await.unwrap().call(invocation()).await.unwrap();
    // Frozen from here: another environment takes the retry.
    let (clock, _) = Clock::fake_at_unix(NOON);
    let config = tollgate::Config::from_toml_str(FLUSHING).unwrap();
    let (other, _worker) = Tollgate::builder(config).store_arc(store.clone()).clock(clock).build();
    let retry = invoke(tollgate_lambda::service(other, tower::service_fn(conformance::app)), &payload).await;
    assert_eq!(retry.status, 200, "{:?}", retry.body);
    assert_eq!(retry.headers.get("idempotent-replayed").map(String::as_str), Some("true"), "{:?}", retry.headers);
}

#[path = "../../../tests/common/alerts.rs"]
mod alerts;

/// On the on-demand model no worker runs between invocations: the flush after an invocation
/// writes the crossing it saw and delivers it, with the default time limits, verified by the
/// official Standard Webhooks library.
#[cfg(feature = "alerts")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_invocation_the_alerts_due_are_delivered() {
    let Some(receiver) = alerts::Receiver::start() else { return };
    let (_dir, secret) = alerts::secret_file();
    let config = format!(
        "[usage]\nnotify_at = [80]\n[alerts]\n[alerts.endpoints.ops]\nurl = \"{}\"\nsecret_file = \"{secret}\"\n\
         [plans.p]\nrate = \"100000/s\"\nquotas.requests = {{ limit = 10, period = \"day\" }}\n\
         [tenants.acme]\nplan = \"p\"\nkeys = [\"key-acme\"]\n",
        receiver.url("/hook")
    );
    let store = Arc::new(MemoryStore::new());
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let config = tollgate::Config::from_toml_str(&config).unwrap();
    let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).build();
    let serve = engine.clone();
    let runtime_service = tower::service_fn(move |_: LambdaInvocation| {
        let engine = serve.clone();
        async move {
            for _ in 0..9 {
                assert_eq!(one_request(&engine).await, 200);
            }
            Ok::<(), lambda_http::Error>(())
        }
    });
    let mut service = tower::Layer::layer(&tollgate_lambda::FlushLayer::new(engine.clone()), runtime_service);
    fake.advance(Duration::from_secs(60));
    service.ready().await.unwrap().call(invocation()).await.unwrap();
    let got = receiver.received().await;
    assert_eq!(got.len(), 1, "delivered before the invocation ended: {got:?}");
    assert!(got[0].verified && got[0].valid, "{got:?}");
}

/// The example function (examples/lambda.rs), as `cargo lambda` builds it.
#[allow(dead_code)]
#[path = "../examples/lambda.rs"]
mod example;

/// The example's function over a fresh engine on a fake clock, as `run_with_usage` serves it.
fn example_function(
    engine: &Tollgate,
) -> impl tower::Service<
    lambda_http::Request,
    Response = http::Response<lambda_http::Body>,
    Error = lambda_http::Error,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    let app = engine.clone();
    let api = tower::service_fn(move |request| {
        let engine = app.clone();
        async move { example::handler(&engine, request).await }
    });
    tollgate_lambda::service_with_usage(engine.clone(), "/v1/usage", api)
}

async fn call_example(engine: &Tollgate, req: Req) -> Resp {
    invoke(example_function(engine), &event(Payload::Rest, &req)).await
}

#[tokio::test]
async fn the_example_function_serves_every_route_a_tenant_calls_about_itself() {
    let (clock, fake) = Clock::fake_at_unix(NOON);
    let config = tollgate::Config::from_toml_str(example::CONFIG).unwrap();
    let (engine, _worker) = Tollgate::builder(config).clock(clock).build();
    let acme = |method, path| Req::new(method, path).key("tg_free_acme");
    let umbrella = |method, path| Req::new(method, path).key("tg_metered_umbrella");

    // The usage route is answered in front of the layer, on the REST API's stage too: ten
    // polls spend none of the free plan's burst of 5.
    for _ in 0..10 {
        let usage = call_example(&engine, acme("GET", "/v1/usage")).await;
        assert_eq!(usage.status, 200, "{usage:?}");
        assert!(!usage.headers.contains_key("ratelimit"), "not through the layer: {usage:?}");
        let body: Value = serde_json::from_str(&usage.body).unwrap();
        assert_eq!(body["tenant"], "acme", "{body}");
    }
    for i in 0..5 {
        assert_eq!(call_example(&engine, acme("GET", "/v1/items")).await.status, 200, "request {i} of the burst");
    }
    assert_eq!(call_example(&engine, acme("GET", "/v1/items")).await.status, 429, "the burst is spent");
    assert_eq!(call_example(&engine, Req::new("GET", "/v1/usage")).await.status, 401, "no key");

    // The spend cap: read, refused above the plan's maximum, lowered by the tenant itself.
    let cap = call_example(&engine, umbrella("GET", "/v1/spend/cap")).await;
    assert_eq!(cap.status, 200, "{cap:?}");
    assert_eq!(serde_json::from_str::<Value>(&cap.body).unwrap()["limit"], "1", "{cap:?}");
    let above = umbrella("PUT", "/v1/spend/cap").body(r#"{"limit": "6.00", "mode": "hard"}"#.into());
    let above = call_example(&engine, above).await;
    assert_eq!(above.status, 422, "{above:?}");
    assert_eq!(above.headers.get("content-type").map(String::as_str), Some("application/problem+json"));
    let lower = umbrella("PUT", "/v1/spend/cap").body(r#"{"limit": "0.50", "mode": "hard"}"#.into());
    assert_eq!(call_example(&engine, lower).await.status, 200);
    // 250 tokens at $0.001 are $0.25: two generations reach the cap, the third is refused.
    let statuses: Vec<u16> = futures_statuses(&engine, || umbrella("POST", "/v1/generate"), 3).await;
    assert_eq!(statuses, [200, 200, 402]);

    // A plan without a recharge or tenant alerts: the routes are mounted and answer 403.
    fake.advance(Duration::from_secs(5));
    let recharge = call_example(&engine, acme("GET", "/v1/credits/recharge")).await;
    assert_eq!(recharge.status, 403, "{recharge:?}");
    let endpoint =
        call_example(&engine, acme("PUT", "/v1/alerts/endpoint").body(r#"{"url": "https://example.com/a"}"#.into()))
            .await;
    assert_eq!(endpoint.status, 403, "{endpoint:?}");
}

/// `n` requests `make` builds, one after another, and their statuses.
async fn futures_statuses(engine: &Tollgate, make: impl Fn() -> Req, n: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(call_example(engine, make()).await.status);
    }
    statuses
}

#[tokio::test]
async fn a_tenant_route_without_the_layer_in_front_names_the_cause() {
    let (engine, _, _) = conformance::engine().await;
    let request = lambda_http::Request::new(lambda_http::Body::Empty);
    let reply = tollgate_lambda::spend_cap(&engine, &request).await;
    assert_eq!(reply.status(), 500);
    let lambda_http::Body::Text(body) = reply.body() else { panic!("a text body") };
    assert!(body.contains("tollgate_lambda::service"), "{body}");
}
