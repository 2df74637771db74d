//! [tollgate](https://docs.rs/tollgate) for actix-web 4: a native middleware that enforces
//! each tenant's plan over tollgate's shared engine, an extractor for the calling tenant, and a
//! route for Stripe webhooks.
//!
//! The middleware decides as tollgate's tower layer does, through the same engine calls
//! ([`FrontDoor::admit_request`], [`tollgate::response::respond_for`]): the same decisions,
//! rate-limit headers, problem+json bodies, usage recording and `Idempotency-Key` handling
//! (replays answered with the stored response). It never buffers a request body: bodies
//! stream through, fingerprinted as they are read for the first request with an
//! `Idempotency-Key`, whose response is held (up to `limits.idempotency_max_body`) to be
//! stored for its replays.
//!
//! ```no_run
//! use actix_web::{web, App, HttpServer};
//! use tollgate_actix::{Tenant, TollgateMiddleware};
//!
//! async fn generate(tenant: Tenant) -> String {
//!     let tokens = 1234; // computed by the handler
//!     tenant.record("tokens", tokens).expect("the tokens meter is declared");
//!     format!("{} on {}", tenant.tenant(), tenant.plan())
//! }
//!
//! #[actix_web::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = tollgate::Config::from_path("tollgate.toml")?;
//!     let (engine, worker) = tollgate::Tollgate::builder(config).open().await?;
//!     let worker = tokio::spawn(worker.run());
//!     let app_engine = engine.clone();
//!     HttpServer::new(move || {
//!         App::new()
//!             .wrap(TollgateMiddleware::new(app_engine.clone()))
//!             .route("/v1/generate", web::post().to(generate))
//!     })
//!     .bind(("127.0.0.1", 8080))?
//!     .run()
//!     .await?;
//!     engine.shutdown().await?; // the last usage reaches the store
//!     worker.await?;
//!     Ok(())
//! }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::{cell::RefCell, ops::Deref, rc::Rc};

use actix_web::{
    body::{BoxBody, EitherBody, MessageBody},
    dev::{forward_ready, Extensions, Service, ServiceRequest, ServiceResponse, Transform},
    http::{
        header::{HeaderName, HeaderValue, CONTENT_TYPE},
        StatusCode,
    },
    FromRequest, HttpMessage, HttpRequest, HttpResponse, Responder, ResponseError,
};
use futures_util::future::{ready, LocalBoxFuture, Ready};
use futures_util::Stream as _;
use tollgate::door::Admission;
use tollgate::door::ClientAddr;
use tollgate::door::FrontDoor;
use tollgate::door::RequestView;
use tollgate::door::Ticket;
use tollgate::Identity;
use tollgate::{
    response::{ProblemJson, RejectionResponder},
    Rejection, TenantContext, Tollgate,
};

/// The actix-web middleware: wrap an `App` (or a scope) with it to enforce every tenant's
/// plan. Each worker thread's app gets its own [`FrontDoor`] on the one shared engine.
///
/// An admitted request carries its [`TenantContext`] (read it with the [`Tenant`] extractor)
/// and its [`ClientAddr`] (the connection's peer) in its extensions; its response carries the
/// rate-limit headers. A rejection is answered by the responder
/// ([`ProblemJson`] unless [`responder`](Self::responder) says otherwise; a gRPC status for a
/// gRPC content type), exactly as the tower layer answers.
#[derive(Debug, Clone)]
pub struct TollgateMiddleware<P = ProblemJson> {
    tollgate: Tollgate,
    responder: P,
}

impl TollgateMiddleware {
    /// The middleware over `tollgate`, answering rejections with problem+json.
    #[must_use]
    pub fn new(tollgate: Tollgate) -> Self {
        Self { tollgate, responder: ProblemJson }
    }
}

impl<P> TollgateMiddleware<P> {
    /// Answers rejections with `responder` instead.
    pub fn responder<Q: RejectionResponder>(self, responder: Q) -> TollgateMiddleware<Q> {
        TollgateMiddleware { tollgate: self.tollgate, responder }
    }
}

impl<S, B, P> Transform<S, ServiceRequest> for TollgateMiddleware<P>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
    P: RejectionResponder,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = TollgateService<S, P>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(TollgateService {
            service: Rc::new(service),
            door: RefCell::new(self.tollgate.front_door()),
            responder: self.responder.clone(),
        }))
    }
}

/// The service made by [`TollgateMiddleware`].
#[derive(Debug)]
pub struct TollgateService<S, P = ProblemJson> {
    service: Rc<S>,
    door: RefCell<FrontDoor>,
    responder: P,
}

/// An actix-web request as the engine reads it.
struct View<'a> {
    request: &'a HttpRequest,
    extensions: std::cell::Ref<'a, Extensions>,
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        self.request.method().as_str()
    }

    fn path(&self) -> &str {
        self.request.path()
    }

    fn query(&self) -> Option<&str> {
        self.request.uri().query()
    }

    fn header_values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s [u8]> {
        self.request.headers().get_all(name).map(HeaderValue::as_bytes)
    }

    fn identity(&self) -> Option<&Identity> {
        self.extensions.get::<Identity>()
    }

    /// The [`ClientAddr`] an outer middleware put there, else the connection's peer.
    fn client_addr(&self) -> Option<std::net::IpAddr> {
        self.extensions.get::<ClientAddr>().map(|a| a.0).or_else(|| self.request.peer_addr().map(|p| p.ip()))
    }
}

impl<S, B, P> Service<ServiceRequest> for TollgateService<S, P>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
    P: RejectionResponder,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        // Unless an outer middleware (a trusted proxy's real IP) put one there.
        if let Some(peer) = request.peer_addr() {
            let mut extensions = request.extensions_mut();
            if !extensions.contains::<ClientAddr>() {
                extensions.insert(ClientAddr(peer.ip()));
            }
        }
        let admission = {
            let view = View { request: request.request(), extensions: request.extensions() };
            self.door.borrow_mut().admit_request(&view)
        };
        match admission {
            Admission::Admitted(ticket) if ticket.is_replay() => {
                Box::pin(replay(request, ticket, self.responder.clone()))
            }
            Admission::Admitted(ticket) => {
                let response = admitted(&self.service, request, ticket);
                Box::pin(response)
            }
            // Shadow mode lets an unidentified request through, without a tenant.
            Admission::Rejected(rejection) if rejection.is_shadowed() => {
                let call = self.service.call(request);
                Box::pin(async move { Ok(call.await?.map_into_left_body()) })
            }
            Admission::Rejected(rejection) => {
                let response = reject(request, &self.responder, rejection);
                Box::pin(ready(Ok(response)))
            }
            Admission::Pending(pending) => {
                let tollgate = self.door.borrow().engine().clone();
                let service = self.service.clone();
                let responder = self.responder.clone();
                Box::pin(async move {
                    match tollgate.resolve(pending).await {
                        Ok(ticket) if ticket.is_replay() => replay(request, ticket, responder).await,
                        Ok(ticket) => admitted(&service, request, ticket).await,
                        Err(rejection) if rejection.is_shadowed() => {
                            Ok(service.call(request).await?.map_into_left_body())
                        }
                        Err(rejection) => Ok(reject(request, &responder, rejection)),
                    }
                })
            }
        }
    }
}

/// Runs an admitted request: the tenant's context in, the rate-limit headers on the response
/// head, and the ticket completed with its status (an error of the inner service answered as
/// actix answers it; a future dropped once the service was called bills the request, as
/// `usage.bill_cancelled` says).
fn admitted<S, B>(
    service: &Rc<S>,
    mut request: ServiceRequest,
    mut ticket: Ticket,
) -> impl std::future::Future<Output = Result<ServiceResponse<EitherBody<B>>, actix_web::Error>> + 'static
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    request.extensions_mut().insert(ticket.context());
    // The first request with an `Idempotency-Key`: its payload is fingerprinted as the
    // handler reads it, and what the handler leaves is drained (up to the bound) afterwards.
    let payload = ticket.capture_mut().map(|capture| {
        let print = capture.request_body().clone();
        let rest = Rc::new(RefCell::new(request.take_payload()));
        let reader = (Rc::clone(&rest), print.clone());
        let stream = futures_util::stream::unfold(reader, |(rest, print)| async move {
            let next: Option<Result<bytes::Bytes, actix_web::error::PayloadError>> =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut *rest.borrow_mut()).poll_next(cx)).await;
            match &next {
                Some(Ok(chunk)) => print.update(chunk),
                Some(Err(_)) => print.fail(),
                None => print.end(),
            }
            next.map(|item| (item, (rest, print)))
        });
        // Polled again after its end (a handler may), it answers the end again.
        let stream = futures_util::StreamExt::fuse(stream);
        let boxed: std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, actix_web::error::PayloadError>>>,
        > = Box::pin(stream);
        request.set_payload(actix_web::dev::Payload::from(boxed));
        (rest, print)
    });
    let call = service.call(request);
    ticket.service_called();
    async move {
        let mut response = match call.await {
            Ok(response) => response,
            // An inner middleware's error becomes the response actix sends (with the error's
            // status, without the rate-limit headers, which only a response carries): billed
            // by that status, as the tower layer bills a response.
            Err(error) => {
                // (The handler may not have run: a held route bills what its work recorded.)
                ticket.complete(error.error_response().status().as_u16());
                return Err(error);
            }
        };
        let headers = response.headers_mut();
        ticket.for_each_header(|field, value| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(field.name()), value);
            }
        });
        // The request's place among its tenant's requests in flight (a plan with
        // `concurrency`): held by the body until it has gone.
        let in_flight = ticket.take_in_flight();
        if response.response().extensions().get::<Rejection>().is_some() {
            // Refused by tollgate inside the service (a feature extractor): not billed, the
            // units go back, and the place frees at once.
            ticket.give_back();
            drop(in_flight);
            return Ok(response.map_into_left_body());
        } else if let Some(mut capture) = ticket.capture() {
            // Billed at the head, as every response; stored when its body ends.
            let status = response.status().as_u16();
            let head = response.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
            capture.head(status, head.collect::<Vec<_>>());
            if ticket.holds() {
                // The handler answered; its actual is read from the head (actix has no trailers).
                let head = response.headers();
                ticket.set_actual_from_head(|name| head.get(name.as_str()).map(|v| v.as_bytes()));
            }
            if !ticket.complete(status) {
                // Not billed: nothing stored, the key is released (the capture's drop); the
                // body still holds the request's place until it has gone.
                return Ok(counted(response, in_flight));
            }
            // What the handler left of the payload (once it let go of it), into the
            // fingerprint, for at most `DRAIN_LIMIT` (not for a response that will not be
            // stored).
            let storing = capture.is_storing();
            if let Some((rest, print)) = payload.filter(|(rest, _)| storing && Rc::strong_count(rest) == 1) {
                let drain = async {
                    while print.is_reading() {
                        let next =
                            std::future::poll_fn(|cx| std::pin::Pin::new(&mut *rest.borrow_mut()).poll_next(cx)).await;
                        match next {
                            Some(Ok(chunk)) => print.update(&chunk),
                            Some(Err(_)) => print.fail(),
                            None => print.end(),
                        }
                    }
                };
                if actix_web::rt::time::timeout(tollgate::door::DRAIN_LIMIT, drain).await.is_err() {
                    print.fail();
                }
            }
            let size = match response.response().body().size() {
                actix_web::body::BodySize::Sized(n) => Some(n),
                actix_web::body::BodySize::None => Some(0),
                actix_web::body::BodySize::Stream => None,
            };
            if size == Some(0) || status < 200 || status == 204 || status == 304 {
                // No body to poll: actix sends none.
                capture.finish();
                return Ok(response.map_into_left_body());
            }
            return Ok(response.map_body(|_, body| {
                EitherBody::right(BoxBody::new(Stored {
                    body: Box::pin(body),
                    capture: Some(capture),
                    seen: 0,
                    size,
                    in_flight,
                    held: None,
                }))
            }));
        } else if ticket.holds() {
            // A route that holds: its ticket completes when the body has gone, with what the
            // route's `actual_header` says.
            let head = response.headers();
            ticket.set_actual_from_head(|name| head.get(name.as_str()).map(|v| v.as_bytes()));
            let status = response.status().as_u16();
            let size = match response.response().body().size() {
                actix_web::body::BodySize::Sized(n) => Some(n),
                actix_web::body::BodySize::None => Some(0),
                actix_web::body::BodySize::Stream => None,
            };
            if size == Some(0) || status < 200 || status == 204 || status == 304 {
                // No body to poll: actix sends none.
                ticket.complete(status);
                return Ok(counted(response, in_flight));
            }
            return Ok(response.map_body(|_, body| {
                EitherBody::right(BoxBody::new(Stored {
                    body: Box::pin(body),
                    capture: None,
                    seen: 0,
                    size,
                    in_flight,
                    held: Some((ticket, status)),
                }))
            }));
        } else {
            ticket.complete(response.status().as_u16());
        }
        Ok(counted(response, in_flight))
    }
}

/// A replay: its payload is fingerprinted (up to the bound), never handed to the service; it
/// is answered with the stored response, or 422 for another body.
async fn replay<B, P: RejectionResponder>(
    mut request: ServiceRequest,
    ticket: Ticket,
    responder: P,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let print = tollgate::door::BodyPrint::new(ticket.replay_body_limit());
    let mut payload = request.take_payload();
    let drain = async {
        while print.is_reading() {
            match std::future::poll_fn(|cx| std::pin::Pin::new(&mut payload).poll_next(cx)).await {
                Some(Ok(chunk)) => print.update(&chunk),
                Some(Err(_)) => print.fail(),
                None => print.end(),
            }
        }
    };
    // A body that does not come within the limit has no fingerprint (another body).
    if actix_web::rt::time::timeout(tollgate::door::DRAIN_LIMIT, drain).await.is_err() {
        print.fail();
    }
    match ticket.check_replay_body(print.digest()) {
        Ok(()) => {
            let response = to_actix(tollgate::door::replay_response(&ticket));
            Ok(request.into_response(response).map_into_right_body())
        }
        Err(rejection) => Ok(reject(request, &responder, rejection)),
    }
}

/// The body of the first request with an `Idempotency-Key` (billed at its head): held as it
/// streams, stored with the key when its last bytes have gone (actix stops polling a sized body
/// once they are written). A body that fails, or is dropped before its end, stores nothing:
/// the key is released. Without a capture, the body of a tenant whose plan limits its requests
/// in flight: the request's place (`in_flight`) is held until the body has gone.
struct Stored<B> {
    body: std::pin::Pin<Box<B>>,
    capture: Option<tollgate::door::ResponseCapture>,
    seen: u64,
    size: Option<u64>,
    in_flight: Option<tollgate::door::InFlight>,
    /// The ticket of a route that holds units (`[[routes]] hold`), completed with its status
    /// when the body has gone (given back if it fails; billed as cut off if it is dropped).
    held: Option<(Ticket, u16)>,
}

/// The response, its body holding the request's place among its tenant's requests in flight
/// (if its plan limits them) until it has gone.
fn counted<B: MessageBody + 'static>(
    response: ServiceResponse<B>,
    in_flight: Option<tollgate::door::InFlight>,
) -> ServiceResponse<EitherBody<B>> {
    match in_flight {
        None => response.map_into_left_body(),
        // A stored body without a capture: it only holds the place until the body has gone.
        in_flight => response.map_body(|_, body| {
            EitherBody::right(BoxBody::new(Stored {
                body: Box::pin(body),
                capture: None,
                seen: 0,
                size: None,
                in_flight,
                held: None,
            }))
        }),
    }
}

impl<B: MessageBody> MessageBody for Stored<B> {
    type Error = B::Error;

    fn size(&self) -> actix_web::body::BodySize {
        self.body.size()
    }

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<bytes::Bytes, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.body.as_mut().poll_next(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(chunk))) => {
                this.seen += chunk.len() as u64;
                if let Some(c) = this.capture.as_mut() {
                    c.data(chunk);
                }
                if this.size.is_some_and(|n| this.seen >= n) {
                    if let Some(c) = this.capture.take() {
                        c.finish();
                    }
                    if let Some((ticket, status)) = this.held.take() {
                        ticket.complete(status);
                    }
                    this.in_flight = None;
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => {
                this.capture = None;
                if let Some((ticket, _)) = this.held.take() {
                    ticket.give_back();
                }
                this.in_flight = None;
            }
            std::task::Poll::Ready(None) => {
                if let Some(c) = this.capture.take() {
                    c.finish();
                }
                if let Some((ticket, status)) = this.held.take() {
                    ticket.complete(status);
                }
                this.in_flight = None;
            }
            std::task::Poll::Pending => {}
        }
        polled
    }
}

fn reject<B, P: RejectionResponder>(
    request: ServiceRequest,
    responder: &P,
    rejection: Rejection,
) -> ServiceResponse<EitherBody<B>> {
    let content_type = request.headers().get(CONTENT_TYPE).map(HeaderValue::as_bytes);
    let response = to_actix(tollgate::response::respond_for(content_type, responder, rejection));
    request.into_response(response).map_into_right_body()
}

/// An `http` 1 response (what tollgate builds) as an actix-web one: status, every header in
/// order, the body, and the [`Rejection`] in the extensions when there is one.
fn to_actix(response: http::Response<bytes::Bytes>) -> HttpResponse {
    let (parts, body) = response.into_parts();
    let status = StatusCode::from_u16(parts.status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = HttpResponse::with_body(status, BoxBody::new(body));
    let headers = out.headers_mut();
    for (name, value) in &parts.headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_str().as_bytes()), HeaderValue::from_bytes(value.as_bytes()))
        {
            headers.append(name, value);
        }
    }
    if let Some(rejection) = parts.extensions.get::<Rejection>() {
        out.extensions_mut().insert(rejection.clone());
    }
    out
}

/// The tenant of the request, as the middleware admitted it: dereferences to
/// [`TenantContext`] (`tenant()`, `plan()`, `customer()`, `quota(meter)`, `record(meter, n)`).
///
/// `record` works for as long as you hold it: move it into a streaming body to record usage
/// measured while the response streams. A handler the middleware does not wrap gets a 500
/// naming the cause; `Option<Tenant>` gets `None` instead.
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

impl FromRequest for Tenant {
    type Error = MissingMiddleware;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(req.extensions().get::<TenantContext>().cloned().map(Tenant).ok_or(MissingMiddleware))
    }
}

/// The tenant of a request whose plan includes the feature `F` (declared with
/// [`tollgate::feature!`]); otherwise the extraction answers the engine's 403 problem+json
/// naming the feature (in shadow mode, counted and let through), or 500 without the
/// middleware.
///
/// ```no_run
/// tollgate::feature!(pub InvoiceExport = "invoice_export");
///
/// async fn export(feature: tollgate_actix::RequireFeature<InvoiceExport>) -> String {
///     format!("invoices of {}", feature.tenant())
/// }
/// ```
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

impl<F: tollgate::Feature> FromRequest for RequireFeature<F> {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let Some(tenant) = req.extensions().get::<TenantContext>().cloned() else {
            return ready(Err(MissingMiddleware.into()));
        };
        ready(match tenant.require_feature(F::NAME) {
            Ok(()) => Ok(Self(Tenant(tenant), std::marker::PhantomData)),
            Err(r) => {
                let detail = r.to_string();
                let response = to_actix(tollgate::response::respond(&ProblemJson, r));
                Err(actix_web::error::InternalError::from_response(detail, response).into())
            }
        })
    }
}

/// Why [`Tenant`] could not be extracted: the request did not pass through
/// [`TollgateMiddleware`]. A configuration error: answered 500 with a problem+json body.
#[derive(Debug, Clone, Copy)]
pub struct MissingMiddleware;

impl std::fmt::Display for MissingMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no tenant in the request extensions: is tollgate_actix::TollgateMiddleware wrapping this route?")
    }
}

impl std::error::Error for MissingMiddleware {}

impl ResponseError for MissingMiddleware {
    fn status_code(&self) -> StatusCode {
        StatusCode::INTERNAL_SERVER_ERROR
    }

    fn error_response(&self) -> HttpResponse {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": self.to_string(),
        });
        HttpResponse::InternalServerError().content_type("application/problem+json").body(body.to_string())
    }
}

/// A [`Rejection`] as an actix-web response: what the middleware answers with its default
/// responder ([`ProblemJson`]): status, `application/problem+json` body, `WWW-Authenticate` on
/// 401, rate-limit headers, `Retry-After`, and the rejection in the extensions. For handlers
/// that ask the engine themselves (through [`Tollgate::front_door`]).
#[derive(Debug, Clone)]
pub struct RejectionResponse(pub Rejection);

impl From<Rejection> for RejectionResponse {
    fn from(rejection: Rejection) -> Self {
        Self(rejection)
    }
}

impl Responder for RejectionResponse {
    type Body = BoxBody;

    fn respond_to(self, _req: &HttpRequest) -> HttpResponse {
        to_actix(tollgate::response::respond(&ProblemJson, self.0))
    }
}

/// The method and body of a call of a tenant's own route, the body read up to one byte past
/// `max` (enough for the route to answer 413; a body that fails midway is read as empty).
async fn tenant_route_call(
    request: &HttpRequest,
    mut payload: actix_web::web::Payload,
    max: usize,
) -> (http::Method, bytes::BytesMut) {
    let cap = max + 1;
    let mut body = bytes::BytesMut::new();
    while body.len() < cap {
        match std::future::poll_fn(|cx| std::pin::Pin::new(&mut payload).poll_next(cx)).await {
            Some(Ok(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(cap - body.len())]),
            Some(Err(_)) => {
                body.clear();
                break;
            }
            None => break,
        }
    }
    // actix-web's `Method` is http 0.2's: by its name.
    let method = http::Method::from_bytes(request.method().as_str().as_bytes()).unwrap_or(http::Method::POST);
    (method, body)
}

/// Who calls a tenant route: [`Tollgate::caller`](tollgate::Tollgate::caller) of the request.
fn caller_of(engine: &tollgate::Tollgate, request: &HttpRequest) -> tollgate::Caller {
    engine.caller(&View { request, extensions: request.extensions() })
}

/// The route an application mounts for its tenants' own alert endpoint
/// ([`Tollgate::tenant_alert_endpoint`](tollgate::Tollgate::tenant_alert_endpoint)), inside
/// the middleware: the calling tenant sets its own (a key with the scope `alerts:write`).
/// `GET` answers `{"url": …}`, `PUT` with `{"url": "https://…"}` registers it and answers the new signing
/// secret once, `DELETE` removes it; refusals are problem+json 4xx and store nothing.
///
/// ```no_run
/// # fn app(engine: tollgate::Tollgate) {
/// use actix_web::{web, App};
/// let app = App::new().service(
///     web::scope("/v1")
///         .wrap(tollgate_actix::TollgateMiddleware::new(engine.clone()))
///         .route("/alerts/endpoint", tollgate_actix::alert_endpoint(engine)),
/// );
/// # }
/// ```
#[must_use]
pub fn alert_endpoint(engine: tollgate::Tollgate) -> actix_web::Route {
    actix_web::web::route().to(move |tenant: Tenant, request: HttpRequest, payload: actix_web::web::Payload| {
        let engine = engine.clone();
        async move {
            let caller = caller_of(&engine, &request);
            let (method, body) = tenant_route_call(&request, payload, tollgate::door::ALERT_ENDPOINT_MAX_BODY).await;
            to_actix(engine.tenant_alert_endpoint(&tenant, &caller, &method, &body).await)
        }
    })
}

/// The route an application mounts for its tenants' own spend cap
/// ([`Tollgate::tenant_spend_cap`](tollgate::Tollgate::tenant_spend_cap)), inside the
/// middleware: the calling tenant sets its own (a key with the scope `caps:write`, which keys
/// have by default). `GET` answers the cap in force, `PUT` with
/// `{"limit": "25.00", "mode": "hard"}` sets the tenant's own (at most the plan's
/// `spend.max_limit`), `DELETE` removes it; refusals are problem+json 4xx and store nothing.
///
/// ```no_run
/// # fn app(engine: tollgate::Tollgate) {
/// use actix_web::{web, App};
/// let app = App::new().service(
///     web::scope("/v1")
///         .wrap(tollgate_actix::TollgateMiddleware::new(engine.clone()))
///         .route("/spend/cap", tollgate_actix::spend_cap(engine)),
/// );
/// # }
/// ```
#[must_use]
pub fn spend_cap(engine: tollgate::Tollgate) -> actix_web::Route {
    actix_web::web::route().to(move |tenant: Tenant, request: HttpRequest, payload: actix_web::web::Payload| {
        let engine = engine.clone();
        async move {
            let caller = caller_of(&engine, &request);
            let (method, body) = tenant_route_call(&request, payload, tollgate::door::SPEND_CAP_MAX_BODY).await;
            to_actix(engine.tenant_spend_cap(&tenant, &caller, &method, &body).await)
        }
    })
}

/// The route an application mounts for its tenants' own auto-recharge
/// ([`Tollgate::tenant_recharge`](tollgate::Tollgate::tenant_recharge)), inside the
/// middleware: the calling tenant turns its own recharge on or off (a key given the scope
/// `recharge:write` by name; else 403 `scope-missing`). `GET` answers it, `PUT`
/// with `{"below": 10000, "to": 50000, "monthly_limit": "200.00"}` turns it on within the
/// plan's bounds on a plan whose recharge sets `tenant_may_set = true` (else 403
/// `recharge-not-allowed`: only the operator may), `DELETE` turns it off; refusals are
/// problem+json 4xx (422 outside the bounds) and store nothing.
///
/// ```no_run
/// # fn app(engine: tollgate::Tollgate) {
/// use actix_web::{web, App};
/// let app = App::new().service(
///     web::scope("/v1")
///         .wrap(tollgate_actix::TollgateMiddleware::new(engine.clone()))
///         .route("/credits/recharge", tollgate_actix::recharge(engine)),
/// );
/// # }
/// ```
#[must_use]
pub fn recharge(engine: tollgate::Tollgate) -> actix_web::Route {
    actix_web::web::route().to(move |tenant: Tenant, request: HttpRequest, payload: actix_web::web::Payload| {
        let engine = engine.clone();
        async move {
            let caller = caller_of(&engine, &request);
            let (method, body) = tenant_route_call(&request, payload, tollgate::door::RECHARGE_MAX_BODY).await;
            to_actix(engine.tenant_recharge(&tenant, &caller, &method, &body).await)
        }
    })
}

/// The route an application mounts for its tenants' own usage
/// ([`Tollgate::tenant_usage`](tollgate::Tollgate::tenant_usage)): `GET` answers the calling
/// tenant's plan, quotas, balances, spend and usage as JSON (docs/usage.schema.json), with
/// `ETag` and `Cache-Control: private, max-age=1`; other methods are 405 (`Allow: GET,
/// HEAD`), a request without a known credential the middleware's 401, a key without the
/// scope `usage:read` 403 `scope-missing`.
///
/// Mount it **outside** the middleware, registered before the scope the middleware wraps:
/// it identifies its caller itself and charges nothing (inside, every poll would spend a rate
/// cell and a unit of the route's meter).
///
/// ```no_run
/// # fn app(engine: tollgate::Tollgate) {
/// use actix_web::{web, App};
/// let app = App::new()
///     .route("/v1/usage", tollgate_actix::usage(engine.clone()))
///     .service(web::scope("/v1").wrap(tollgate_actix::TollgateMiddleware::new(engine)));
/// # }
/// ```
#[must_use]
pub fn usage(engine: tollgate::Tollgate) -> actix_web::Route {
    actix_web::web::route().to(move |request: HttpRequest| {
        let answer = engine.tenant_usage(&View { request: &request, extensions: request.extensions() });
        async move { to_actix(answer.await) }
    })
}

/// A `POST` route for Stripe webhooks over tollgate's
/// [`WebhookHandler`](tollgate::billing::WebhookHandler): the `Stripe-Signature` header and the
/// raw body in; 200 for every verified event, 400 for a bad signature, 500 when the store
/// failed (Stripe delivers it again).
///
/// Mount it outside the middleware (Stripe is not a tenant):
///
/// ```no_run
/// # fn app(engine: tollgate::Tollgate) -> Result<(), Box<dyn std::error::Error>> {
/// use actix_web::{web, App};
/// let webhooks = engine.webhook_handler()?;
/// let app = App::new()
///     .route("/stripe/webhook", tollgate_actix::stripe_webhook(webhooks))
///     .service(web::scope("/v1").wrap(tollgate_actix::TollgateMiddleware::new(engine)));
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub fn stripe_webhook(handler: impl Into<std::sync::Arc<tollgate::billing::WebhookHandler>>) -> actix_web::Route {
    let handler = handler.into();
    actix_web::web::post().to(move |request: HttpRequest, mut payload: actix_web::web::Payload| {
        let handler = handler.clone();
        async move {
            let signature = request.headers().get("stripe-signature").and_then(|v| v.to_str().ok());
            // Read up to the handler's cap, explicitly (not actix-web's 256 KiB default): one
            // byte more is enough for the handler to answer 413.
            let cap = tollgate::billing::WebhookHandler::MAX_BODY + 1;
            let mut body = bytes::BytesMut::new();
            while body.len() < cap {
                match std::future::poll_fn(|cx| std::pin::Pin::new(&mut payload).poll_next(cx)).await {
                    Some(Ok(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(cap - body.len())]),
                    Some(Err(_)) => {
                        body.clear();
                        break;
                    }
                    None => break,
                }
            }
            to_actix(handler.handle(signature, &body).await.into_response())
        }
    })
}

#[doc = include_str!("../docs/guide.md")]
pub mod guide {}

/// The operator dashboard ([`Dashboard`](tollgate::dashboard::Dashboard), feature
/// `dashboard`) as a scope at `path` (`"/ops/tollgate"`): read-only pages of the tenants,
/// billing, alerts and the node, rendered on the server with their stylesheet compiled in.
///
/// Register it **outside** the middleware's scope (operators are not tenants), and give it a
/// token (`[dashboard] token_file`, [`Access::from_config`](tollgate::dashboard::Access::from_config))
/// unless the application authenticates the path itself ([`Access::Open`](tollgate::dashboard::Access::Open)).
///
/// ```no_run
/// # fn app(engine: tollgate::Tollgate) -> Result<(), Box<dyn std::error::Error>> {
/// use actix_web::{web, App};
/// use tollgate::dashboard::{Access, Dashboard};
/// let dashboard = Dashboard::for_engine(&engine, Access::from_config(&engine.config())?);
/// let app = App::new()
///     .service(tollgate_actix::dashboard("/ops/tollgate", dashboard))
///     .service(web::scope("/v1").wrap(tollgate_actix::TollgateMiddleware::new(engine)));
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "dashboard")]
#[cfg_attr(docsrs, doc(cfg(feature = "dashboard")))]
#[must_use]
pub fn dashboard(path: &str, dashboard: tollgate::dashboard::Dashboard) -> actix_web::Scope {
    actix_web::web::scope(path.trim_end_matches('/')).default_service(actix_web::web::to(
        move |request: HttpRequest, payload: actix_web::web::Payload| {
            let dashboard = dashboard.clone();
            async move {
                let (method, body) = tenant_route_call(&request, payload, tollgate::dashboard::MAX_BODY).await;
                // What the scopes matched (this one's path, and any it is nested in) is the base
                // of the dashboard's links; the rest is the page, taken from the raw path (the
                // router's is decoded, and a tenant id may hold `%3F`): as many segments as
                // the scopes matched are skipped, `/` being the one character never decoded.
                let info = request.match_info();
                let matched = info.as_str().len().saturating_sub(info.unprocessed().len());
                let segments = info.as_str().get(..matched).unwrap_or("").trim_end_matches('/').matches('/').count();
                let raw = request.path();
                let cut = raw.match_indices('/').nth(segments).map_or(raw.len(), |(i, _)| i);
                let (base, rest) = raw.split_at(cut);
                let rest = if rest.is_empty() { "/" } else { rest };
                let uri = match request.query_string() {
                    "" => rest.to_owned(),
                    q => format!("{rest}?{q}"),
                };
                let mut out = http::Request::new(body.freeze());
                *out.method_mut() = method;
                *out.uri_mut() = uri.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
                for (name, value) in request.headers() {
                    if let (Ok(name), Ok(value)) = (
                        http::HeaderName::from_bytes(name.as_str().as_bytes()),
                        http::HeaderValue::from_bytes(value.as_bytes()),
                    ) {
                        out.headers_mut().append(name, value);
                    }
                }
                // The client an application behind a proxy it trusts put in the request (with
                // the address the proxy says); else the peer's address (for the limit on wrong
                // tokens) and whether it came over TLS, or a proxy said so (actix reads
                // `Forwarded` and `X-Forwarded-Proto`).
                let given = request.extensions().get::<tollgate::dashboard::Client>().copied();
                let client = given.unwrap_or_else(|| {
                    let tls = request.connection_info().scheme() == "https";
                    tollgate::dashboard::Client::new(request.peer_addr().map(|a| a.ip()), tls)
                });
                out.extensions_mut().insert(client);
                to_actix(dashboard.respond(base, out).await)
            }
        },
    ))
}
