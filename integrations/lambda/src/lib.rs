//! [tollgate](https://docs.rs/tollgate) for AWS Lambda: a `lambda_http` handler behind
//! tollgate's tower layer, in both Lambda models, with usage reaching the store although the
//! process is frozen between invocations.
//!
//! ```no_run
//! use lambda_http::{service_fn, Body, Error, Request, Response};
//!
//! async fn handler(request: Request) -> Result<Response<Body>, Error> {
//!     let tenant = request.extensions().get::<tollgate::TenantContext>().expect("behind tollgate");
//!     Ok(Response::new(Body::from(format!("hello {}", tenant.tenant()))))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let config = tollgate::Config::from_path("tollgate.toml")?;
//!     let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
//!     tollgate_lambda::run(engine, worker, service_fn(handler)).await
//! }
//! ```
//!
//! [`run`] picks the model from the environment:
//! - **On-demand** (`AWS_LAMBDA_MAX_CONCURRENCY` unset or 1): one invocation at a time, and the
//!   process is frozen between them, so background tasks cannot be relied on. After each
//!   response has been posted, and before the next event is fetched, [`FlushLayer`] flushes
//!   usage when `usage.flush_interval` has passed since the last flush (so store traffic still
//!   follows the flush interval, and the store's latency is never in a response). The graceful
//!   shutdown hook flushes the rest and gives leases back within Lambda's ~500 ms.
//! - **Managed Instances** (`AWS_LAMBDA_MAX_CONCURRENCY` > 1): one process serves several
//!   invocations at once and is not frozen; the ordinary worker runs, as on a server.
//!
//! Both register [`SnapStart`]: before a snapshot, usage is flushed and leases are given back;
//! after a restore, each copy draws its own node id and secrets and reads the clock again.
//!
//! A request from API Gateway or a function URL carries tollgate's [`ClientAddr`] (the
//! `sourceIp` they saw) in its extensions, and its path without the API Gateway stage
//! ([`FromEventLayer`]).
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use lambda_http::{
    lambda_runtime::{self, LambdaInvocation},
    request::RequestContext,
    BoxFuture, Error, Request, RequestExt, SnapStartResource,
};
use tollgate::door::ClientAddr;
use tollgate::{
    layer::{Buffered, FromConfig},
    response::ProblemJson,
    Tollgate, TollgateLayer, Worker,
};
use tower::{Layer, Service};

pub use lambda_http;

/// The time the graceful-shutdown hook gives the final flush: Lambda allows the runtime about
/// 500 ms once an extension is registered.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_millis(450);

/// Whether this process is a Managed Instances environment (several invocations at once):
/// `AWS_LAMBDA_MAX_CONCURRENCY` above 1.
#[must_use]
pub fn is_managed_instances() -> bool {
    std::env::var("AWS_LAMBDA_MAX_CONCURRENCY").ok().and_then(|v| v.trim().parse::<u32>().ok()).is_some_and(|n| n > 1)
}

/// Runs `handler` behind tollgate until Lambda shuts the environment down: the handler wrapped
/// by [`service`], the graceful-shutdown hook (final flush, leases given back), [`SnapStart`],
/// and per model, [`FlushLayer`] (on-demand) or the background worker (Managed Instances; it
/// also runs on-demand, while the process is thawed, for lease refills and the directory).
///
/// # Errors
/// What the Lambda runtime returns.
///
/// # Panics
/// Outside Lambda (the runtime's environment variables missing), as `lambda_http::run` does.
pub async fn run<S, B, E>(engine: Tollgate, worker: Worker, handler: S) -> Result<(), Error>
where
    S: Service<Request, Response = http::Response<B>, Error = E> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + Sync + 'static,
    B::Error: std::fmt::Debug,
    E: std::fmt::Debug + Into<lambda_runtime::Diagnostic> + Send + 'static,
{
    let service = service(engine.clone(), handler);
    serve(engine, worker, service).await
}

/// [`run`], with the tenants' own usage route at `usage_path` answered in front of the layer
/// ([`service_with_usage`]): one function serves the API and the usage its tenants poll,
/// charging nothing for the polls.
///
/// ```no_run
/// # async fn f(engine: tollgate::Tollgate, worker: tollgate::Worker) -> Result<(), lambda_http::Error> {
/// # let handler = lambda_http::service_fn(|_r: lambda_http::Request| async {
/// #     Ok::<_, lambda_http::Error>(lambda_http::Response::new(lambda_http::Body::Empty)) });
/// tollgate_lambda::run_with_usage(engine, worker, "/v1/usage", handler).await
/// # }
/// ```
///
/// # Errors
/// What the Lambda runtime returns.
///
/// # Panics
/// Outside Lambda (the runtime's environment variables missing), as `lambda_http::run` does.
pub async fn run_with_usage<S, B, E>(
    engine: Tollgate,
    worker: Worker,
    usage_path: impl Into<String>,
    handler: S,
) -> Result<(), Error>
where
    S: Service<Request, Response = http::Response<B>, Error = E> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + Sync + 'static,
    B::Error: std::fmt::Debug,
    E: std::fmt::Debug + Into<lambda_runtime::Diagnostic> + Send + 'static,
{
    let service = service_with_usage(engine.clone(), usage_path, handler);
    serve(engine, worker, service).await
}

/// What [`run`] and [`run_with_usage`] share: the graceful-shutdown hook, the worker per
/// model, SnapStart, and the runtime over `service`.
async fn serve<T, R, E>(engine: Tollgate, worker: Worker, service: T) -> Result<(), Error>
where
    T: Service<Request, Response = R, Error = E> + Clone + Send + 'static,
    T::Future: Send + 'static,
    R: lambda_http::IntoResponse + Send + Sync + 'static,
    E: std::fmt::Debug + Into<lambda_runtime::Diagnostic> + Send + 'static,
{
    let on_shutdown = engine.clone();
    lambda_runtime::spawn_graceful_shutdown_handler(move || async move {
        shutdown(&on_shutdown).await;
    })
    .await;
    let managed = is_managed_instances();
    // On-demand, flushes and exports are the invocations' (FlushLayer): a flush frozen
    // half-way in the background would hold the pipeline until the next thaw.
    let worker = if managed { worker } else { worker.without_flush() };
    let snapstart = SnapStart::new(engine.clone());
    if std::env::var("AWS_LAMBDA_INITIALIZATION_TYPE").as_deref() == Ok("snap-start") {
        // Nothing of the worker's may be half-way when the snapshot is taken, nor run in a
        // copy before it has its own ids: it starts after the restore.
        snapstart.start_after_restore(worker);
    } else {
        tokio::spawn(worker.run());
    }
    let runtime = lambda_runtime::Runtime::new(adapter(service)).register_snapstart_resource(Arc::new(snapstart));
    if managed {
        runtime.run_concurrent().await
    } else {
        runtime.layer(FlushLayer::new(engine)).run().await
    }
}

/// `service` as the Lambda runtime calls it: events parsed and responses converted by
/// `lambda_http` (as `lambda_http::run` does), with every value of a repeated header kept.
/// API Gateway REST APIs and ALBs send a repeated header's values in `multiValueHeaders` and
/// only the last one in `headers`, which `lambda_http` lets win; a repeated API key or
/// `Idempotency-Key` header must reach tollgate as repeated (and be refused), as through every
/// other door.
pub fn adapter<'a, S, R, E>(service: S) -> KeepRepeatedHeaders<lambda_http::Adapter<'a, R, S>>
where
    S: Service<Request, Response = R, Error = E>,
    S::Future: Send + 'a,
    R: lambda_http::IntoResponse,
{
    KeepRepeatedHeaders { inner: lambda_http::Adapter::from(service) }
}

/// The service made by [`adapter`].
#[derive(Debug, Clone)]
pub struct KeepRepeatedHeaders<S> {
    inner: S,
}

impl<S> Service<lambda_runtime::LambdaEvent<lambda_http::request::LambdaRequest>> for KeepRepeatedHeaders<S>
where
    S: Service<lambda_runtime::LambdaEvent<lambda_http::request::LambdaRequest>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut event: lambda_runtime::LambdaEvent<lambda_http::request::LambdaRequest>) -> Self::Future {
        use lambda_http::request::LambdaRequest;
        let (headers, multi) = match &mut event.payload {
            LambdaRequest::ApiGatewayV1(r) => (&mut r.headers, &r.multi_value_headers),
            LambdaRequest::Alb(r) => (&mut r.headers, &r.multi_value_headers),
            _ => return self.inner.call(event),
        };
        for name in multi.keys() {
            if multi.get_all(name).iter().nth(1).is_some() {
                headers.remove(name);
            }
        }
        self.inner.call(event)
    }
}

/// What the graceful-shutdown hook of [`run`] does within [`SHUTDOWN_BUDGET`]: the engine's
/// one shutdown order ([`Tollgate::shutdown_within`]: stop admitting, wait for open holds,
/// settle open keys, flush, give the leases back), without the export: it may not fit in Lambda's ~500 ms, and the
/// scheduled export ([`export_handler`]) sends what is stored.
pub async fn shutdown(engine: &Tollgate) {
    match engine.shutdown_within(SHUTDOWN_BUDGET, false).await {
        Ok(report) => tracing::info!(
            records = report.flush.records,
            keys_settled = report.keys_settled,
            leases_returned = report.leases_returned,
            "tollgate: stopped"
        ),
        Err(e) => tracing::error!(error = %e, "tollgate: usage not flushed at shutdown"),
    }
}

/// `handler` behind tollgate, as [`run`] serves it: [`FromEventLayer`] then
/// [`TollgateLayer`]. Call it with requests `lambda_http` parsed (as tests do).
pub fn service<S>(
    engine: Tollgate,
    handler: S,
) -> FromEventService<tollgate::TollgateService<S, FromConfig, ProblemJson, Buffered>> {
    // Lambda's bodies are held whole: fingerprinted at once, handed on as they are.
    FromEventLayer.layer(TollgateLayer::new(engine).buffered_bodies().layer(handler))
}

/// [`service`] with the tenants' own usage route ([`Tollgate::tenant_usage`]) in front of the
/// layer: a request whose path (the stage taken off, the query aside) is `usage_path` is
/// answered as [`usage_handler`] answers it, identifying its caller itself and charging
/// nothing; every other request goes to `handler` behind the layer. What [`run_with_usage`]
/// serves; call it with requests `lambda_http` parsed (as tests do).
pub fn service_with_usage<S>(
    engine: Tollgate,
    usage_path: impl Into<String>,
    handler: S,
) -> FromEventService<UsageFirst<tollgate::TollgateService<S, FromConfig, ProblemJson, Buffered>>> {
    let inner = TollgateLayer::new(engine.clone()).buffered_bodies().layer(handler);
    FromEventLayer.layer(UsageFirst { engine, path: Arc::from(usage_path.into()), inner })
}

/// The service inside [`service_with_usage`]: the usage route answered, every other request
/// handed to the layer. Its responses are `lambda_http`'s (the layer's converted as the
/// runtime would convert them).
#[derive(Clone)]
pub struct UsageFirst<S> {
    engine: Tollgate,
    path: Arc<str>,
    inner: S,
}

impl<S> std::fmt::Debug for UsageFirst<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageFirst").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The future of [`UsageFirst`]'s service.
pub type UsageFirstFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<lambda_http::Body>, E>> + Send>>;

impl<S, R> Service<Request> for UsageFirst<S>
where
    S: Service<Request, Response = R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: lambda_http::IntoResponse + Send + 'static,
{
    type Response = http::Response<lambda_http::Body>;
    type Error = S::Error;
    type Future = UsageFirstFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if request.uri().path() == &*self.path {
            let answer = self.engine.tenant_usage(&request);
            return Box::pin(async move { Ok(to_lambda(answer.await)) });
        }
        // The clone made ready by `poll_ready` serves the call; a fresh one waits for the next.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let reply = ready.call(request);
        Box::pin(async move { Ok(lambda_http::IntoResponse::into_response(reply.await?).await) })
    }
}

/// An engine's answer as a `lambda_http` response: JSON and problem+json bodies as text.
fn to_lambda(reply: http::Response<bytes::Bytes>) -> http::Response<lambda_http::Body> {
    reply.map(|body| match body.is_empty() {
        true => lambda_http::Body::Empty,
        false => lambda_http::Body::Text(String::from_utf8_lossy(&body).into_owned()),
    })
}

/// Makes a request `lambda_http` parsed read as it would on a server:
/// - the path without the API Gateway stage (`lambda_http` puts a REST API's stage in front
///   of the path, so `[[routes]]` would not match): tollgate and the handler see the path the
///   client asked for, as with `AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH`;
/// - the caller's address from the event (`requestContext.identity.sourceIp` for REST APIs,
///   `requestContext.http.sourceIp` for HTTP APIs and function URLs) as tollgate's
///   [`ClientAddr`]. ALB events carry none (only `X-Forwarded-For`).
#[derive(Debug, Clone, Copy, Default)]
pub struct FromEventLayer;

impl<S> Layer<S> for FromEventLayer {
    type Service = FromEventService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FromEventService { inner }
    }
}

/// The service made by [`FromEventLayer`].
#[derive(Debug, Clone)]
pub struct FromEventService<S> {
    inner: S,
}

/// Takes an API Gateway stage off the front of the path (`lambda_http` puts a REST API's
/// stage there; an HTTP API's named stage is in its `rawPath`), keeping the path's encoding
/// and the query. Nothing else is touched: `$default` stages, function URLs, ALBs.
fn strip_stage(request: &mut Request) {
    let stage = match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(ctx)) => ctx.stage.as_deref(),
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.stage.as_deref(),
        _ => None,
    };
    let Some(stage) = stage.filter(|s| !s.is_empty() && *s != "$default") else {
        return;
    };
    let path = request.uri().path();
    let Some(rest) = path.strip_prefix('/').and_then(|p| p.strip_prefix(stage)) else {
        return;
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return;
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match request.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let mut parts = request.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

/// The source IP of a Lambda request, from its request context.
pub fn source_ip(request: &Request) -> Option<std::net::IpAddr> {
    let ip = match request.request_context_ref()? {
        RequestContext::ApiGatewayV1(ctx) => ctx.identity.source_ip.as_deref(),
        RequestContext::ApiGatewayV2(ctx) => ctx.http.source_ip.as_deref(),
        _ => None,
    };
    ip?.parse().ok()
}

impl<S: Service<Request>> Service<Request> for FromEventService<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        strip_stage(&mut request);
        if let Some(ip) = source_ip(&request) {
            request.extensions_mut().insert(ClientAddr(ip));
        }
        self.inner.call(request)
    }
}

/// The time after an invocation given to the delivery of the alerts due (when a flush ran):
/// each attempt gets the least of `alerts.timeout` and the time left.
const ALERTS_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// A Lambda runtime layer for the on-demand model: after an invocation's response has been
/// posted, and before the next event is fetched, flushes usage (and the alerts the process
/// saw) if `usage.flush_interval` has passed since the last flush, then delivers the alerts
/// due, within 5 s at most. A frozen process runs no background task, so this is how
/// usage reaches the store between invocations; the response never waits for it.
#[derive(Debug, Clone)]
pub struct FlushLayer {
    engine: Tollgate,
    last: Arc<AtomicI64>,
}

impl FlushLayer {
    /// A layer flushing `engine`; the interval counts from now.
    #[must_use]
    pub fn new(engine: Tollgate) -> Self {
        let now = engine.clock().unix_nanos();
        Self { engine, last: Arc::new(AtomicI64::new(now)) }
    }

    /// Flushes if the flush interval has passed since the last flush; returns whether it did.
    /// A failed flush is logged, and its usage kept for the next one.
    pub async fn flush_if_due(&self) -> bool {
        let now = self.engine.clock().unix_nanos();
        let interval = i64::try_from(self.engine.flush_interval().as_nanos()).unwrap_or(i64::MAX);
        let last = self.last.load(Ordering::Relaxed);
        if now.saturating_sub(last) < interval {
            return false;
        }
        // One flush per interval even if two invocations end at once (Managed Instances).
        if self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return false;
        }
        if let Err(e) = self.engine.flush().await {
            tracing::warn!(error = %e, "tollgate: flush after the invocation failed; its usage goes with the next flush");
        }
        true
    }
}

impl<S> Layer<S> for FlushLayer {
    type Service = FlushService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FlushService { inner, flush: self.clone() }
    }
}

/// The service made by [`FlushLayer`].
#[derive(Debug, Clone)]
pub struct FlushService<S> {
    inner: S,
    flush: FlushLayer,
}

impl<S> Service<LambdaInvocation> for FlushService<S>
where
    S: Service<LambdaInvocation, Response = (), Error = lambda_runtime::Error>,
    S::Future: 'static,
{
    type Response = ();
    type Error = lambda_runtime::Error;
    type Future = Pin<Box<dyn Future<Output = Result<(), lambda_runtime::Error>>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        // Thawed after a flush interval or more (or the first invocation): leases this
        // environment could not renew while frozen are not spent until a call renews them.
        let now = self.flush.engine.clock().unix_nanos();
        let interval = i64::try_from(self.flush.engine.flush_interval().as_nanos()).unwrap_or(i64::MAX);
        if now.saturating_sub(self.flush.last.load(Ordering::Relaxed)) >= interval {
            let stopped = self.flush.engine.stop_stale_leases();
            if stopped > 0 {
                tracing::warn!(
                    stopped,
                    "tollgate: leases not renewed while the environment was frozen wait for a store call"
                );
            }
        }
        // The inner service posts the response to the Runtime API before it returns.
        let began = std::time::Instant::now();
        let invoked = self.inner.call(invocation);
        let flush = self.flush.clone();
        Box::pin(async move {
            let result = invoked.await;
            // Before the environment is frozen: the keyed requests' settlements (the fleet
            // answers their retries from them), then the usage if due.
            let engine = &flush.engine;
            let budget = (engine.store_timeout() * 2).min(std::time::Duration::from_secs(2));
            if !engine.settlements_done(began, budget).await {
                tracing::warn!(
                    "tollgate: an Idempotency-Key settlement did not reach the store before the invocation ended; \
                     its claim frees itself after its in-flight time"
                );
            }
            // The places of a fleet concurrency this invocation's requests freed.
            if !engine.places_released(budget).await {
                tracing::warn!(
                    "tollgate: a place of a fleet concurrency was not given back before the invocation ended; it \
                     frees itself after limits.place_ttl"
                );
            }
            // The alerts this process wrote (its flush) or others left due: delivered within
            // the budget, as no worker runs while the environment is frozen (each attempt's
            // time limit the time left, each settled as it ends; one not started keeps its
            // place).
            if flush.flush_if_due().await {
                engine.deliver_alerts_within(ALERTS_BUDGET).await;
            }
            // The recharges this invocation's refills claimed: charged now, as no worker runs
            // while the environment is frozen (one not delivered is taken again by the next
            // refill once its claim lapses, under the same keys).
            engine.deliver_recharges_within(ALERTS_BUDGET).await;
            result
        })
    }
}

/// The SnapStart hooks of an engine (registered by [`run`]): before the snapshot, every
/// lease is given back and all usage is flushed (a failed flush fails the snapshot, rather
/// than letting each copy flush the same usage again); after a restore, the copy draws its
/// own node id and secrets from the operating system, forgets what the old secrets keyed,
/// and reads the wall clock again.
#[derive(Debug)]
pub struct SnapStart {
    engine: Tollgate,
    worker: std::sync::Mutex<Option<Worker>>,
}

impl SnapStart {
    /// The hooks of `engine`.
    #[must_use]
    pub fn new(engine: Tollgate) -> Self {
        Self { engine, worker: std::sync::Mutex::new(None) }
    }

    /// Spawns `worker` once a copy is restored (after its new ids are drawn), not before the
    /// snapshot: nothing of the worker's is then half-way in the snapshot.
    pub fn start_after_restore(&self, worker: Worker) {
        *self.worker.lock().unwrap_or_else(|e| e.into_inner()) = Some(worker);
    }
}

impl SnapStartResource for SnapStart {
    fn before_snapshot(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let report = self.engine.before_snapshot().await?;
            tracing::info!(records = report.records, "tollgate: settled before the snapshot");
            Ok(())
        })
    }

    fn after_restore(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.engine.after_restore().await;
            if let Some(worker) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
                tokio::spawn(worker.run());
            }
            Ok(())
        })
    }
}

/// A Lambda function for a scheduled export pass (an EventBridge schedule, say): flushes,
/// then exports closed windows to the billing sink, and answers with what it did. Run it in
/// its own function with `lambda_runtime::run(tollgate_lambda::export_handler(engine))`.
#[must_use]
pub fn export_handler(
    engine: Tollgate,
) -> impl Service<
    lambda_runtime::LambdaEvent<serde_json::Value>,
    Response = serde_json::Value,
    Error = Error,
    Future = Pin<Box<dyn Future<Output = Result<serde_json::Value, Error>> + Send>>,
> + Clone {
    tower::service_fn(move |_event: lambda_runtime::LambdaEvent<serde_json::Value>| {
        let engine = engine.clone();
        Box::pin(async move {
            let flushed = engine.flush().await?;
            let exported = engine.export().await?;
            Ok(serde_json::json!({
                "flushed_records": flushed.records,
                "events": exported.events,
                "units": exported.units,
                "dead_letters": exported.dead_letters,
                "retries": exported.retries,
                "unbillable": exported.unbillable,
                "waiting": exported.waiting,
                "halted": exported.halted,
            }))
        }) as Pin<Box<dyn Future<Output = Result<serde_json::Value, Error>> + Send>>
    })
}

/// The future of [`usage_handler`]'s service.
pub type UsageFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<lambda_http::Body>, std::convert::Infallible>> + Send>>;

/// The tenants' own usage route ([`Tollgate::tenant_usage`]) as a Lambda HTTP service: `GET`
/// answers the calling tenant's plan, quotas, balances, spend and usage as JSON
/// (docs/usage.schema.json). It reads the event as [`service`] does ([`FromEventLayer`]: the
/// path without the stage, the caller's address) and identifies its caller itself, charging
/// nothing: keep it **outside** [`service`], as its own function behind its own API Gateway
/// route (`GET /v1/usage`), or call it first for that path in a function of your own that
/// hands every other request to [`service`]. Its function is its own node: it keeps its own
/// views, at most one made per tenant per second.
///
/// ```no_run
/// # async fn f(engine: tollgate::Tollgate) -> Result<(), lambda_http::Error> {
/// lambda_http::run(tollgate_lambda::usage_handler(engine)).await
/// # }
/// ```
#[must_use]
pub fn usage_handler(
    engine: Tollgate,
) -> FromEventService<
    impl Service<
            Request,
            Response = http::Response<lambda_http::Body>,
            Error = std::convert::Infallible,
            Future = UsageFuture,
        > + Clone,
> {
    FromEventLayer.layer(tower::service_fn(move |request: Request| {
        let answer = engine.tenant_usage(&request);
        Box::pin(async move { Ok(to_lambda(answer.await)) }) as UsageFuture
    }))
}

/// A tenant's own spend cap ([`Tollgate::tenant_spend_cap`]) answered inside a handler behind
/// [`service`], which admitted the caller: `GET` the cap in force, `PUT` with
/// `{"limit": "25.00", "mode": "hard"}` the tenant's own (at most the plan's
/// `spend.max_limit`; a key with the scope `caps:write`), `DELETE` removes it; refusals are
/// problem+json 4xx and store nothing. Without the layer in front, 500 naming the cause.
///
/// ```no_run
/// use lambda_http::{Body, Error, Request, Response};
///
/// async fn handler(engine: &tollgate::Tollgate, request: Request) -> Result<Response<Body>, Error> {
///     Ok(match request.uri().path() {
///         "/v1/spend/cap" => tollgate_lambda::spend_cap(engine, &request).await,
///         "/v1/credits/recharge" => tollgate_lambda::recharge(engine, &request).await,
///         "/v1/alerts/endpoint" => tollgate_lambda::alert_endpoint(engine, &request).await,
///         _ => Response::new(Body::from("the API's own routes")),
///     })
/// }
/// ```
pub async fn spend_cap(engine: &Tollgate, request: &Request) -> http::Response<lambda_http::Body> {
    tenant_route(engine, request, OwnRoute::SpendCap).await
}

/// A tenant's own auto-recharge ([`Tollgate::tenant_recharge`]) answered inside a handler
/// behind [`service`]: `GET` answers it, `PUT` with
/// `{"below": 10000, "to": 50000, "monthly_limit": "200.00"}` turns it on within the plan's
/// bounds (a plan whose recharge sets `tenant_may_set = true`, a key given the scope
/// `recharge:write`), `DELETE` turns it off; refusals are problem+json 4xx and store nothing.
/// Mounted as [`spend_cap`] shows.
pub async fn recharge(engine: &Tollgate, request: &Request) -> http::Response<lambda_http::Body> {
    tenant_route(engine, request, OwnRoute::Recharge).await
}

/// A tenant's own alert endpoint ([`Tollgate::tenant_alert_endpoint`]) answered inside a
/// handler behind [`service`]: `GET` answers `{"url": …}`, `PUT` with `{"url": "https://…"}`
/// registers it and answers the new signing secret once (a plan with `tenant_alerts`, a key
/// with the scope `alerts:write`), `DELETE` removes it; refusals are problem+json 4xx and store
/// nothing. Mounted as [`spend_cap`] shows.
pub async fn alert_endpoint(engine: &Tollgate, request: &Request) -> http::Response<lambda_http::Body> {
    tenant_route(engine, request, OwnRoute::AlertEndpoint).await
}

/// The tenant routes a handler answers through this crate.
#[derive(Debug, Clone, Copy)]
enum OwnRoute {
    SpendCap,
    Recharge,
    AlertEndpoint,
}

/// A tenant route answered for the tenant the layer admitted. Lambda hands the body over
/// whole (at most 6 MB); the engine answers 413 past its route's bound.
async fn tenant_route(engine: &Tollgate, request: &Request, route: OwnRoute) -> http::Response<lambda_http::Body> {
    let Some(tenant) = request.extensions().get::<tollgate::TenantContext>() else {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": "no tenant in the request extensions: is this handler behind tollgate_lambda::service, \
                       with tenant_context enabled?",
        });
        return http::Response::builder()
            .status(http::StatusCode::INTERNAL_SERVER_ERROR)
            .header(http::header::CONTENT_TYPE, "application/problem+json")
            .body(lambda_http::Body::Text(body.to_string()))
            .unwrap_or_default();
    };
    let caller = engine.caller(request);
    let (method, body) = (request.method(), request.body().as_ref());
    let reply = match route {
        OwnRoute::SpendCap => engine.tenant_spend_cap(tenant, &caller, method, body).await,
        OwnRoute::Recharge => engine.tenant_recharge(tenant, &caller, method, body).await,
        OwnRoute::AlertEndpoint => engine.tenant_alert_endpoint(tenant, &caller, method, body).await,
    };
    to_lambda(reply)
}

/// The future of [`webhook_handler`]'s service.
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub type WebhookFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<lambda_http::Body>, std::convert::Infallible>> + Send>>;

/// A Lambda HTTP function for Stripe webhooks (behind a function URL or API Gateway, outside
/// tollgate's layer): the `Stripe-Signature` header and the raw body (API Gateway's base64
/// decoded by `lambda_http`) go to tollgate's
/// [`WebhookHandler`](tollgate::billing::WebhookHandler); 200 for every verified event, 400
/// for a bad signature, 500 when the store failed (Stripe delivers it again). Run it with
/// `lambda_http::run(tollgate_lambda::webhook_handler(handler))`.
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub fn webhook_handler(
    handler: impl Into<Arc<tollgate::billing::WebhookHandler>>,
) -> impl Service<
    Request,
    Response = http::Response<lambda_http::Body>,
    Error = std::convert::Infallible,
    Future = WebhookFuture,
> + Clone {
    let handler = handler.into();
    tower::service_fn(move |request: Request| {
        let handler = handler.clone();
        Box::pin(async move {
            let signature = request.headers().get("stripe-signature").and_then(|v| v.to_str().ok());
            let reply = handler.handle(signature, request.body().as_ref()).await.into_response();
            Ok(reply.map(|body| lambda_http::Body::Text(String::from_utf8_lossy(&body).into_owned())))
        }) as WebhookFuture
    })
}

/// The result of one usage event handled by [`eventbridge_handler`].
type EventFuture<R> = Pin<Box<dyn Future<Output = Result<R, Error>> + Send>>;

/// A handler for SQS batches of usage events (see [`tollgate::events::UsageMessage`] for the body's
/// shape; `[events.products]` maps product codes to meters). Each message is recorded with
/// the id of its body's `EventID`, else its SQS `messageId`, so a redelivered message is
/// counted once.
///
/// Answers with **partial batch failures** (`batchItemFailures`, which the event source
/// mapping must enable with `ReportBatchItemFailures`): only messages the store could not
/// record now are listed, and so redelivered. A malformed message, or one refused for good
/// (too old, in the future, over a hard quota, an unknown tenant), is acknowledged — a
/// redelivery could not succeed — and counted (`tollgate_usage_events_total{outcome}`) and
/// logged.
///
/// ```no_run
/// # async fn f(engine: tollgate::Tollgate) -> Result<(), lambda_runtime::Error> {
/// lambda_runtime::run(tollgate_lambda::sqs_handler(engine)).await
/// # }
/// ```
#[must_use]
pub fn sqs_handler(
    engine: Tollgate,
) -> impl Service<
    lambda_runtime::LambdaEvent<aws_lambda_events::sqs::SqsEvent>,
    Response = aws_lambda_events::sqs::SqsBatchResponse,
    Error = Error,
    Future = EventFuture<aws_lambda_events::sqs::SqsBatchResponse>,
> + Clone {
    tower::service_fn(move |event: lambda_runtime::LambdaEvent<aws_lambda_events::sqs::SqsEvent>| {
        let engine = engine.clone();
        Box::pin(async move { Ok(record_sqs(&engine, &event.payload).await) })
            as EventFuture<aws_lambda_events::sqs::SqsBatchResponse>
    })
}

/// Records the messages of an SQS batch: the answer lists the messages to redeliver.
pub async fn record_sqs(
    engine: &Tollgate,
    batch: &aws_lambda_events::sqs::SqsEvent,
) -> aws_lambda_events::sqs::SqsBatchResponse {
    let messages: Vec<tollgate::events::QueueMessage<'_>> = batch
        .records
        .iter()
        .map(|r| {
            tollgate::events::QueueMessage::new(r.body.as_deref().unwrap_or("").as_bytes(), r.message_id.as_deref())
        })
        .collect();
    let outcomes = engine.record_messages(&messages).await;
    let mut response = aws_lambda_events::sqs::SqsBatchResponse::default();
    for (record, outcome) in batch.records.iter().zip(outcomes) {
        if let Err(e) = outcome {
            if !e.is_retryable() {
                continue;
            }
            if let Some(id) = &record.message_id {
                let mut failure = aws_lambda_events::sqs::BatchItemFailure::default();
                failure.item_identifier = id.clone();
                response.batch_item_failures.push(failure);
            }
        }
    }
    response
}

/// A handler for EventBridge events whose `detail` is a usage event (see
/// [`tollgate::events::UsageMessage`]), recorded with the id of its `EventID`, else the EventBridge
/// event's `id`. A store failure answers an error, so that Lambda (or EventBridge's retry
/// policy) delivers the event again; a malformed event, or one refused for good, is answered
/// with `{"outcome": "refused", "reason": …}` (no retry could succeed), counted and logged.
/// A recorded one answers `{"outcome": "applied"}` or `{"outcome": "duplicate"}`.
#[must_use]
pub fn eventbridge_handler(
    engine: Tollgate,
) -> impl Service<
    lambda_runtime::LambdaEvent<aws_lambda_events::eventbridge::EventBridgeEvent>,
    Response = serde_json::Value,
    Error = Error,
    Future = EventFuture<serde_json::Value>,
> + Clone {
    tower::service_fn(move |event: lambda_runtime::LambdaEvent<aws_lambda_events::eventbridge::EventBridgeEvent>| {
        let engine = engine.clone();
        Box::pin(async move { record_eventbridge(&engine, &event.payload).await }) as EventFuture<serde_json::Value>
    })
}

/// Records the usage event of an EventBridge event: an error when the store failed (retry).
pub async fn record_eventbridge(
    engine: &Tollgate,
    event: &aws_lambda_events::eventbridge::EventBridgeEvent,
) -> Result<serde_json::Value, Error> {
    let body = serde_json::to_vec(&event.detail)?;
    let message = tollgate::events::QueueMessage::new(&body, event.id.as_deref());
    let outcome = engine.record_messages(std::slice::from_ref(&message)).await.pop();
    match outcome {
        Some(Ok(tollgate::store::EventOutcome::Applied)) => Ok(serde_json::json!({ "outcome": "applied" })),
        Some(Ok(_)) => Ok(serde_json::json!({ "outcome": "duplicate" })),
        Some(Err(e)) if e.is_retryable() => Err(Box::new(e)),
        Some(Err(e)) => Ok(serde_json::json!({ "outcome": "refused", "reason": e.label(), "detail": e.to_string() })),
        None => Err("no outcome for the event".into()),
    }
}

#[doc = include_str!("../docs/guide.md")]
pub mod guide {}
