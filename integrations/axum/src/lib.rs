//! [tollgate](https://docs.rs/tollgate) for axum: an extractor for the calling tenant (who,
//! on which plan, its remaining quota, and a handle to record usage), a response for
//! rejections, and a route for Stripe webhooks.
//!
//! The enforcement itself is tollgate's tower layer, which axum takes as it is:
//!
//! ```no_run
//! use axum::{routing::post, Router};
//! use tollgate_axum::Tenant;
//!
//! async fn generate(tenant: Tenant) -> String {
//!     let tokens = 1234; // computed by the handler
//!     tenant.record("tokens", tokens).expect("the tokens meter is declared");
//!     let left = tenant.quota("tokens").map_or(u64::MAX, |q| q.remaining);
//!     format!("{} on {}: {left} tokens left this period", tenant.tenant(), tenant.plan())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = tollgate::Config::from_path("tollgate.toml")?;
//! let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
//! tokio::spawn(worker.run());
//! let app = Router::new()
//!     .route("/v1/generate", post(generate))
//!     .layer(tollgate::TollgateLayer::new(engine.clone()));
//! # let _: Router = app;
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::ops::Deref;

use axum::{
    extract::{FromRequestParts, OptionalFromRequestParts},
    response::{IntoResponse, Response},
};
use http::{request::Parts, HeaderValue};
use tollgate::{Rejection, TenantContext};

/// The tenant of the request, as tollgate's layer admitted it: dereferences to
/// [`TenantContext`] (`tenant()`, `plan()`, `customer()`, `quota(meter)`, `record(meter, n)`).
///
/// `record` works for as long as you hold it: move it into a streaming body to record usage
/// measured while the response streams. A handler behind a route the layer does not cover
/// (or a layer built with `tenant_context(false)`) gets a 500 naming the cause;
/// `Option<Tenant>` gets `None` instead.
#[derive(Debug, Clone)]
pub struct Tenant(pub TenantContext);

impl Tenant {
    /// The context itself.
    #[must_use]
    pub fn into_inner(self) -> TenantContext {
        self.0
    }
}

impl Deref for Tenant {
    type Target = TenantContext;

    fn deref(&self) -> &TenantContext {
        &self.0
    }
}

/// Why [`Tenant`] could not be extracted: the request did not pass tollgate's layer (or the
/// layer was built with `tenant_context(false)`). A configuration error: answered 500.
#[derive(Debug, Clone, Copy)]
pub struct MissingLayer;

impl std::fmt::Display for MissingLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "no tenant in the request extensions: is tollgate::TollgateLayer on this route, \
             with tenant_context enabled?",
        )
    }
}

impl std::error::Error for MissingLayer {}

impl IntoResponse for MissingLayer {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": self.to_string(),
        });
        let mut response = (http::StatusCode::INTERNAL_SERVER_ERROR, body.to_string()).into_response();
        response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = MissingLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<TenantContext>().cloned().map(Tenant).ok_or(MissingLayer)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Tenant {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<TenantContext>().cloned().map(Tenant))
    }
}

/// The tenant of a request whose plan includes the feature `F` (declared with
/// [`tollgate::feature!`]); otherwise the extraction answers the engine's 403 problem+json
/// naming the feature (in shadow mode, counted and let through), or 500 without the layer.
///
/// ```no_run
/// tollgate::feature!(pub InvoiceExport = "invoice_export");
///
/// async fn export(tollgate_axum::RequireFeature(tenant, _): tollgate_axum::RequireFeature<InvoiceExport>) -> String {
///     format!("invoices of {}", tenant.tenant())
/// }
/// ```
///
/// A route rule with `feature = "invoice_export"` in the configuration refuses such
/// requests before the handler (and charges nothing); the extractor is for handlers that
/// decide per request, or routes the configuration does not describe.
pub struct RequireFeature<F>(pub Tenant, pub std::marker::PhantomData<F>);

impl<F> std::fmt::Debug for RequireFeature<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RequireFeature").field(&self.0).finish()
    }
}

impl<F> Deref for RequireFeature<F> {
    type Target = TenantContext;

    fn deref(&self) -> &TenantContext {
        &self.0
    }
}

impl<S: Send + Sync, F: tollgate::Feature> FromRequestParts<S> for RequireFeature<F> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let tenant = parts.extensions.get::<TenantContext>().cloned().ok_or_else(|| MissingLayer.into_response())?;
        tenant.require_feature(F::NAME).map_err(|r| RejectionResponse(r).into_response())?;
        Ok(Self(Tenant(tenant), std::marker::PhantomData))
    }
}

/// A middleware that puts the connection's peer address in the request as tollgate's
/// [`ClientAddr`](tollgate::door::ClientAddr), the type every front door uses: axum's
/// `ConnectInfo<SocketAddr>`, present when the app is served with
/// `into_make_service_with_connect_info::<SocketAddr>()`. Add it outside tollgate's layer, so
/// that it runs first:
///
/// ```no_run
/// # async fn run(engine: tollgate::Tollgate, app: axum::Router) -> std::io::Result<()> {
/// let app = app
///     .layer(tollgate::TollgateLayer::new(engine))
///     .layer(axum::middleware::from_fn(tollgate_axum::client_addr));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
/// # }
/// ```
pub async fn client_addr(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
    if let Some(peer) = peer {
        request.extensions_mut().insert(tollgate::door::ClientAddr(peer.ip()));
    }
    next.run(request).await
}

/// A [`Rejection`] as an axum response: what the tower layer answers with its default
/// responder ([`ProblemJson`](tollgate::response::ProblemJson)) — status,
/// `application/problem+json` body, `WWW-Authenticate` on 401, rate-limit headers,
/// `Retry-After`, and the rejection in the extensions — for handlers that ask the engine
/// themselves (through [`Tollgate::front_door`](tollgate::Tollgate::front_door), on routes the
/// layer does not also cover). For a layer with another responder, use
/// [`tollgate::response::respond`] with it.
#[derive(Debug, Clone)]
pub struct RejectionResponse(pub Rejection);

impl From<Rejection> for RejectionResponse {
    fn from(rejection: Rejection) -> Self {
        Self(rejection)
    }
}

impl IntoResponse for RejectionResponse {
    fn into_response(self) -> Response {
        tollgate::response::respond(&tollgate::response::ProblemJson, self.0).map(axum::body::Body::from)
    }
}

/// The body of a call of a tenant's own route, read up to one byte past `max` (a longer one,
/// or one that fails midway, as `max + 1` bytes: the route answers 413).
async fn bounded_body(body: axum::body::Body, max: usize) -> bytes::Bytes {
    let cap = max + 1;
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, cap)).await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => bytes::Bytes::from(vec![0; cap]),
    }
}

/// The route an application mounts for its tenants' own alert endpoint
/// ([`Tollgate::tenant_alert_endpoint`](tollgate::Tollgate::tenant_alert_endpoint)), behind
/// tollgate's layer: the calling tenant sets its own (a key with the scope `alerts:write`).
/// `GET` answers `{"url": …}`, `PUT` with `{"url": "https://…"}` registers it and answers the new
/// signing secret once, `DELETE` removes it; refusals (a plan without `tenant_alerts`, a URL
/// that is not https or resolves to a private address) are problem+json 4xx and store nothing.
///
/// ```no_run
/// # async fn run(engine: tollgate::Tollgate, api: axum::Router) {
/// let app = api
///     .route("/v1/alerts/endpoint", tollgate_axum::alert_endpoint(engine.clone()))
///     .layer(tollgate::TollgateLayer::new(engine));
/// # let _: axum::Router = app;
/// # }
/// ```
pub fn alert_endpoint<S>(engine: tollgate::Tollgate) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let handler = move |tenant: Tenant, request: axum::extract::Request| {
        let engine = engine.clone();
        async move {
            let caller = engine.caller(&request);
            let method = request.method().clone();
            let body = bounded_body(request.into_body(), tollgate::door::ALERT_ENDPOINT_MAX_BODY).await;
            engine.tenant_alert_endpoint(&tenant, &caller, &method, &body).await.map(axum::body::Body::from)
        }
    };
    axum::routing::get(handler.clone()).put(handler.clone()).delete(handler)
}

/// The route an application mounts for its tenants' own spend cap
/// ([`Tollgate::tenant_spend_cap`](tollgate::Tollgate::tenant_spend_cap)), behind tollgate's
/// layer: the calling tenant sets its own (a key with the scope `caps:write`, which keys have
/// by default). `GET` answers the cap in force, `PUT` with
/// `{"limit": "25.00", "mode": "hard"}` sets the tenant's own (at most the plan's
/// `spend.max_limit`), `DELETE` removes it; refusals (a plan without a spend cap, a limit
/// above the maximum or not an amount) are problem+json 4xx and store nothing.
///
/// ```no_run
/// # async fn run(engine: tollgate::Tollgate, api: axum::Router) {
/// let app = api
///     .route("/v1/spend/cap", tollgate_axum::spend_cap(engine.clone()))
///     .layer(tollgate::TollgateLayer::new(engine));
/// # let _: axum::Router = app;
/// # }
/// ```
pub fn spend_cap<S>(engine: tollgate::Tollgate) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let handler = move |tenant: Tenant, request: axum::extract::Request| {
        let engine = engine.clone();
        async move {
            let caller = engine.caller(&request);
            let method = request.method().clone();
            let body = bounded_body(request.into_body(), tollgate::door::SPEND_CAP_MAX_BODY).await;
            engine.tenant_spend_cap(&tenant, &caller, &method, &body).await.map(axum::body::Body::from)
        }
    };
    axum::routing::get(handler.clone()).put(handler.clone()).delete(handler)
}

/// The route an application mounts for its tenants' own auto-recharge
/// ([`Tollgate::tenant_recharge`](tollgate::Tollgate::tenant_recharge)), behind tollgate's
/// layer: the calling tenant turns its own recharge on or off (a key given the scope
/// `recharge:write` by name; else 403 `scope-missing`). `GET` answers it, `PUT`
/// with `{"below": 10000, "to": 50000, "monthly_limit": "200.00"}` turns it on within the
/// plan's bounds on a plan whose recharge sets `tenant_may_set = true` (else 403
/// `recharge-not-allowed`: only the operator may), `DELETE` turns it off; refusals are
/// problem+json 4xx (422 outside the bounds) and store nothing.
///
/// ```no_run
/// # async fn run(engine: tollgate::Tollgate, api: axum::Router) {
/// let app = api
///     .route("/v1/credits/recharge", tollgate_axum::recharge(engine.clone()))
///     .layer(tollgate::TollgateLayer::new(engine));
/// # let _: axum::Router = app;
/// # }
/// ```
pub fn recharge<S>(engine: tollgate::Tollgate) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let handler = move |tenant: Tenant, request: axum::extract::Request| {
        let engine = engine.clone();
        async move {
            let caller = engine.caller(&request);
            let method = request.method().clone();
            let body = bounded_body(request.into_body(), tollgate::door::RECHARGE_MAX_BODY).await;
            engine.tenant_recharge(&tenant, &caller, &method, &body).await.map(axum::body::Body::from)
        }
    };
    axum::routing::get(handler.clone()).put(handler.clone()).delete(handler)
}

/// The route an application mounts for its tenants' own usage
/// ([`Tollgate::tenant_usage`](tollgate::Tollgate::tenant_usage)): `GET` answers the calling
/// tenant's plan, quotas, balances, spend and usage as JSON (docs/usage.schema.json), with
/// `ETag` and `Cache-Control: private, max-age=1`; other methods are 405 (`Allow: GET,
/// HEAD`), a request without a known credential the layer's 401, a key without the scope
/// `usage:read` 403 `scope-missing`.
///
/// Mount it **outside** tollgate's layer, as below: it identifies its caller itself and
/// charges nothing (inside the layer every poll would spend a rate cell and a unit of the
/// route's meter). It reads the credential as `[identify]` says: the API key header, or with
/// `source = "extension"` the [`Identity`](tollgate::Identity) an authentication layer
/// put in the request (mount that layer over the route too).
///
/// ```no_run
/// # async fn run(engine: tollgate::Tollgate, api: axum::Router) {
/// let app = axum::Router::new()
///     .merge(api.layer(tollgate::TollgateLayer::new(engine.clone())))
///     .route("/v1/usage", tollgate_axum::usage(engine));
/// # let _: axum::Router = app;
/// # }
/// ```
pub fn usage<S>(engine: tollgate::Tollgate) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    // Every method reaches the engine, which answers 405 itself (as every door does).
    axum::routing::any(move |request: axum::extract::Request| {
        let answer = engine.tenant_usage(&request);
        async move { answer.await.map(axum::body::Body::from) }
    })
}

/// A `POST` route for Stripe webhooks over tollgate's
/// [`WebhookHandler`](tollgate::billing::WebhookHandler): the `Stripe-Signature` header and the
/// raw body in; 200 for every verified event, 400 for a bad signature, 500 when the store
/// failed (Stripe delivers it again).
///
/// Mount it outside tollgate's layer (Stripe is not a tenant):
///
/// ```no_run
/// # async fn run(engine: tollgate::Tollgate, api: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
/// let webhooks = engine.webhook_handler()?;
/// let app = axum::Router::new()
///     .merge(api.layer(tollgate::TollgateLayer::new(engine)))
///     .route("/stripe/webhook", tollgate_axum::stripe_webhook(webhooks));
/// # let _: axum::Router = app;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub fn stripe_webhook<S>(
    handler: impl Into<std::sync::Arc<tollgate::billing::WebhookHandler>>,
) -> axum::routing::MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let handler = handler.into();
    axum::routing::post(move |headers: http::HeaderMap, body: axum::body::Body| {
        let handler = handler.clone();
        async move {
            let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
            // Read up to the handler's cap, explicitly (not axum's default limit): one byte
            // more is enough for the handler to answer 413.
            let cap = tollgate::billing::WebhookHandler::MAX_BODY + 1;
            let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, cap)).await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                    bytes::Bytes::from(vec![0; cap])
                }
                Err(_) => bytes::Bytes::new(),
            };
            handler.handle(signature, &body).await.into_response().map(axum::body::Body::from)
        }
    })
}

#[doc = include_str!("../docs/guide.md")]
pub mod guide {}

/// Resolves when the process is asked to stop: **SIGTERM** (how containers, systemd and
/// Kubernetes stop a service) or SIGINT (Ctrl-C) on Unix, Ctrl-C elsewhere. Give it to
/// `axum::serve(…).with_graceful_shutdown(…)`, then call
/// [`Tollgate::shutdown`](tollgate::Tollgate::shutdown), so that the last usage reaches the
/// store and the leases go back before the process exits.
///
/// ```no_run
/// # async fn run(app: axum::Router, engine: tollgate::Tollgate) -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:3000").await?;
/// axum::serve(listener, app).with_graceful_shutdown(tollgate_axum::shutdown_signal()).await?;
/// engine.shutdown().await?;
/// # Ok(())
/// # }
/// ```
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            // No SIGTERM handler could be installed: Ctrl-C alone.
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The operator dashboard ([`Dashboard`](tollgate::dashboard::Dashboard), feature
/// `dashboard`) as a router of the paths under `path` (`"/ops/tollgate"`; `""` for the root),
/// to merge into the application's: read-only pages of the tenants, billing, alerts and the
/// node, rendered on the server with their stylesheet compiled in.
///
/// Merge it **outside** tollgate's layer (operators are not tenants), and give it a token
/// (`[dashboard] token_file`, [`Access::from_config`](tollgate::dashboard::Access::from_config))
/// unless the application authenticates the path itself ([`Access::Open`](tollgate::dashboard::Access::Open)).
///
/// ```no_run
/// # fn run(engine: tollgate::Tollgate, api: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
/// use tollgate::dashboard::{Access, Dashboard};
/// let dashboard = Dashboard::for_engine(&engine, Access::from_config(&engine.config())?);
/// let app = axum::Router::new()
///     .merge(api.layer(tollgate::TollgateLayer::new(engine)))
///     .merge(tollgate_axum::dashboard("/ops/tollgate", dashboard));
/// # let _: axum::Router = app;
/// # Ok(())
/// # }
/// ```
///
/// # Panics
/// When `path` is not empty and does not start with `/`, as axum's `route` does.
#[cfg(feature = "dashboard")]
#[cfg_attr(docsrs, doc(cfg(feature = "dashboard")))]
pub fn dashboard<S>(path: &str, dashboard: tollgate::dashboard::Dashboard) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let base = path.trim_end_matches('/').to_owned();
    let at = base.clone();
    let handler = move |request: axum::extract::Request| {
        let dashboard = dashboard.clone();
        let base = base.clone();
        async move {
            let (mut parts, body) = request.into_parts();
            // Nested in a router (`Router::nest`), the links start with the outer prefix too.
            let outer = parts.extensions.get::<axum::extract::OriginalUri>().map_or_else(String::new, |o| {
                match o.0.path().strip_suffix(parts.uri.path()) {
                    Some(outer) => outer.to_owned(),
                    // `/admin` reaching a dashboard at the root of a router nested there as `/`.
                    None if parts.uri.path() == "/" => o.0.path().to_owned(),
                    None => String::new(),
                }
            });
            // The path under the dashboard, its query kept.
            let rest = parts.uri.path().strip_prefix(base.as_str()).unwrap_or("/");
            let rest = if rest.is_empty() { "/" } else { rest };
            let uri = match parts.uri.query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest.to_owned(),
            };
            parts.uri = uri.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
            // The client's address, for the limit on wrong tokens: the application's own
            // `Client` if it put one (behind a proxy it trusts), else the connection's.
            if parts.extensions.get::<tollgate::dashboard::Client>().is_none() {
                let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
                parts.extensions.insert(tollgate::dashboard::Client::new(peer, false));
            }
            let body = bounded_body(body, tollgate::dashboard::MAX_BODY).await;
            let answer = dashboard.respond(&format!("{outer}{base}"), http::Request::from_parts(parts, body)).await;
            answer.map(axum::body::Body::from)
        }
    };
    let mut router = axum::Router::new()
        .route(&format!("{at}/"), axum::routing::any(handler.clone()))
        .route(&format!("{at}/{{*rest}}"), axum::routing::any(handler.clone()));
    if !at.is_empty() {
        router = router.route(&at, axum::routing::any(handler));
    }
    router
}
