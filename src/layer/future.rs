use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::{request::BodyMode, TollgateBody};
use crate::{
    engine::{BodyPrint, InFlight, Pass, Ticket, DRAIN_LIMIT},
    response::{put_header, reject_for, Rejection, RejectionResponder},
};

type Resolving = Pin<Box<dyn Future<Output = Result<Ticket, Rejection>> + Send>>;

pin_project! {
    /// The response future of a [`TollgateService`](super::TollgateService).
    pub struct ResponseFuture<S, B, P, M = super::SameBody>
    where
        M: BodyMode<B>,
        S: Service<Request<M::Body>>,
    {
        #[pin]
        state: State<S, B, P, S::Future, S::Response>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, P, F, R> {
        // Waiting on the store (an unseen tenant, or an empty quota lease). Boxed: it is rare,
        // and keeps the future small on the common path.
        Pending { resolving: Resolving, waiting: Option<Box<Waiting<S, B, P>>> },
        // Admitted: the inner service runs.
        Inner { #[pin] future: F, ticket: Option<Pass> },
        // Rejected without waiting.
        Ready { response: Option<Response<Bytes>> },
        // A replay: its body is read into its fingerprint, then it is answered with the stored
        // response (or 422). Boxed: rare.
        Replay { replay: Option<Box<Replaying<P>>> },
        // The first request with an `Idempotency-Key`, answered and billed: what the handler
        // left of its body is drained into its fingerprint before the response goes, so the
        // key is settled when the client has the answer. Boxed: rare.
        Draining { draining: Option<Box<Draining<R>>> },
    }
}

struct Waiting<S, B, P> {
    inner: S,
    request: Request<B>,
    responder: P,
    context: bool,
}

/// A first request's response waiting for what its handler left of the request body to be
/// fingerprinted (for at most [`DRAIN_LIMIT`]).
struct Draining<R> {
    response: R,
    capture: crate::engine::ResponseCapture,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    in_flight: Option<InFlight>,
}

/// Polls `print`'s drain, within [`DRAIN_LIMIT`] from the first poll (no limit outside a tokio
/// runtime): ready when drained, or when the time is up (the body then has no fingerprint).
fn drain_within(
    print: &BodyPrint,
    deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if print.poll_drain(cx).is_ready() {
        return Poll::Ready(());
    }
    if deadline.is_none() && tokio::runtime::Handle::try_current().is_ok() {
        *deadline = Some(Box::pin(tokio::time::sleep(DRAIN_LIMIT)));
    }
    if deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready()) {
        print.fail();
        return Poll::Ready(());
    }
    Poll::Pending
}

/// The length a server writes of `response`'s body and then stops at: the body's own, else
/// the one the handler announced in `Content-Length` (a proxied stream): hyper stops polling
/// there, and drops the body.
fn exact_length<B: http_body::Body>(response: &Response<B>) -> Option<u64> {
    let announced = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    response.body().size_hint().exact().or(announced)
}

/// A response whose capture is ready to hold its body: stored at once if it has none.
fn with_capture<B: http_body::Body<Data = Bytes>>(
    response: Response<B>,
    capture: crate::engine::ResponseCapture,
    in_flight: Option<InFlight>,
) -> Response<TollgateBody<B>> {
    // No body a server would poll: ended, of length 0, or a status without one (1xx, 204,
    // 304: the server sends none, whatever the body).
    let status = response.status().as_u16();
    let exact = exact_length(&response);
    let empty = response.body().is_end_stream() || exact == Some(0) || status < 200 || status == 204 || status == 304;
    if empty {
        capture.finish();
        response.map(TollgateBody::inner)
    } else {
        response.map(|body| TollgateBody::stored(body, capture, in_flight, exact))
    }
}

/// The answer of a tenant whose plan limits its requests in flight (kept off the common path):
/// completed as any, its body holding the request's place until it has gone.
#[cold]
#[inline(never)]
fn counted<R: http_body::Body<Data = Bytes>>(
    response: Response<R>,
    ticket: Pass,
    grpc: Grpc,
    in_flight: Option<InFlight>,
) -> Response<TollgateBody<R>> {
    if response.extensions().get::<Rejection>().is_some() {
        // Refused by tollgate inside the service: not billed; the place frees at once.
        ticket.give_back();
        return response.map(TollgateBody::inner);
    }
    match grpc {
        Grpc::Status(code) => {
            ticket.complete_grpc(code);
        }
        _ => {
            ticket.complete(response.status().as_u16());
        }
    }
    response.map(|body| TollgateBody::counted(body, in_flight))
}

/// The answer of a route that holds units (`[[routes]] hold`, kept off the common path): its
/// ticket completes when the body ends, with the route's `actual_header` read in the headers
/// (and in the trailers, if they say it).
#[cold]
#[inline(never)]
fn held<R: http_body::Body<Data = Bytes>>(
    response: Response<R>,
    mut ticket: Pass,
    grpc: Grpc,
) -> Response<TollgateBody<R>> {
    if response.extensions().get::<Rejection>().is_some() {
        // Refused by tollgate inside the service: not billed, the hold goes back.
        ticket.give_back();
        return response.map(TollgateBody::inner);
    }
    ticket.set_actual_from_head(|name| response.headers().get(name).map(http::HeaderValue::as_bytes));
    let status = response.status().as_u16();
    match grpc {
        Grpc::Status(code) => {
            ticket.complete_grpc(code);
            response.map(TollgateBody::inner)
        }
        Grpc::Trailers => response.map(|body| TollgateBody::tracked(body, ticket, status)),
        // No body a server would poll: ended, or a status without one.
        Grpc::No if response.body().is_end_stream() || status < 200 || status == 204 || status == 304 => {
            ticket.complete(status);
            response.map(TollgateBody::inner)
        }
        Grpc::No => {
            let exact = exact_length(&response);
            response.map(|body| TollgateBody::held(body, ticket, status, exact))
        }
    }
}

/// A replay whose body is being read (for at most [`DRAIN_LIMIT`]).
struct Replaying<P> {
    print: BodyPrint,
    ticket: Pass,
    parts: http::request::Parts,
    responder: P,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A replay of the first request with its `Idempotency-Key`: its body is fingerprinted, never
/// handed to the inner service.
fn replaying<B, P, M: BodyMode<B>>(request: Request<B>, ticket: Pass, responder: P) -> Box<Replaying<P>> {
    let (parts, body) = request.into_parts();
    let print = M::replay(body, ticket.replay_body_limit());
    Box::new(Replaying { print, ticket, parts, responder, deadline: None })
}

/// Hands an admitted request to the inner service: its body fingerprinted if it is the first
/// with an `Idempotency-Key`.
#[inline(always)]
pub(crate) fn hand_on<B, M: BodyMode<B>>(request: Request<B>, ticket: &mut Pass) -> Request<M::Body> {
    if !ticket.has_key() {
        return M::plain_request(request);
    }
    printed::<B, M>(request, ticket)
}

#[cold]
#[inline(never)]
fn printed<B, M: BodyMode<B>>(request: Request<B>, ticket: &mut Pass) -> Request<M::Body> {
    match ticket.capture_mut() {
        None => M::plain_request(request),
        Some(capture) => request.map(|body| M::printed(body, capture)),
    }
}

impl<S, B, P, M> ResponseFuture<S, B, P, M>
where
    M: BodyMode<B>,
    S: Service<Request<M::Body>>,
{
    /// The service was called with the request (`future`): from now on the ticket bills a
    /// cut-off request.
    pub(crate) fn inner(future: S::Future, mut ticket: Pass) -> Self {
        ticket.service_called();
        Self { state: State::Inner { future, ticket: Some(ticket) } }
    }

    /// Served without a ticket: shadow mode let an unidentified request through.
    pub(crate) fn passed(future: S::Future) -> Self {
        Self { state: State::Inner { future, ticket: None } }
    }

    pub(crate) fn ready(response: Response<Bytes>) -> Self {
        Self { state: State::Ready { response: Some(response) } }
    }

    pub(crate) fn pending(resolving: Resolving, inner: S, request: Request<B>, responder: P, context: bool) -> Self {
        Self {
            state: State::Pending {
                resolving,
                waiting: Some(Box::new(Waiting { inner, request, responder, context })),
            },
        }
    }

    /// A replay, answered from the store once its body was read.
    pub(crate) fn replay(request: Request<B>, ticket: Pass, responder: P) -> Self {
        Self { state: State::Replay { replay: Some(replaying::<B, P, M>(request, ticket, responder)) } }
    }
}

impl<S, B, P, M> std::fmt::Debug for ResponseFuture<S, B, P, M>
where
    M: BodyMode<B>,
    S: Service<Request<M::Body>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Pending { .. } => "pending",
            State::Inner { .. } => "inner",
            State::Ready { .. } => "ready",
            State::Replay { .. } => "replay",
            State::Draining { .. } => "draining",
        };
        f.debug_struct("ResponseFuture").field("state", &state).finish()
    }
}

const DONE: &str = "ResponseFuture polled after completion";

/// Where a response's gRPC status is, if it is a gRPC answer.
enum Grpc {
    /// Not a gRPC answer: billed by its HTTP status.
    No,
    /// In its headers (a trailers-only answer: how tonic answers a handler's error).
    Status(u8),
    /// In its trailers (a success, or a stream that fails midway): billed when they come.
    Trailers,
}

#[inline(always)]
fn grpc_status<B>(response: &http::Response<B>) -> Grpc {
    if response.headers().is_empty() {
        return Grpc::No;
    }
    // Every response with a header is asked: found as the API key header is, without hashing
    // the name in a small map (the first value, as `get` gives).
    let content_type = crate::engine::values_of(response.headers(), &http::header::CONTENT_TYPE).next();
    // gRPC-Web sends its status in the body, not in HTTP trailers: billed by HTTP status.
    let grpc =
        content_type.is_some_and(|c| c.starts_with(b"application/grpc") && !c.starts_with(b"application/grpc-web"));
    if !grpc {
        return Grpc::No;
    }
    match super::body::grpc_code(response.headers().get("grpc-status")) {
        Some(code) => Grpc::Status(code),
        None => Grpc::Trailers,
    }
}

/// The response of the first request with an `Idempotency-Key`: completed as any response,
/// and held to be stored (not a gRPC answer's: its key is released when the call is settled;
/// nor a refusal's). `Err`: what the handler left of the request body is to be drained first.
#[cold]
#[inline(never)]
fn keyed<R: http_body::Body<Data = Bytes>>(
    mut response: Response<R>,
    mut ticket: Pass,
) -> Result<Response<TollgateBody<R>>, Box<Draining<Response<R>>>> {
    // Read before tollgate's own headers are added.
    let grpc = grpc_status(&response);
    let plain = matches!(grpc, Grpc::No);
    let refused = response.extensions().get::<Rejection>().is_some();
    let mut capture = if plain && !refused { ticket.capture() } else { None };
    let status = response.status().as_u16();
    if let Some(c) = capture.as_mut() {
        c.head(status, response.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
    }
    let headers = response.headers_mut();
    ticket.emit(&mut |field, value| put_header(headers, field, value));
    if refused {
        // Refused by tollgate inside the service: not billed, the key released.
        ticket.give_back();
        return Ok(response.map(TollgateBody::inner));
    }
    if ticket.holds() {
        // The handler answered; its actual is read from the head (a stored response's
        // trailers are not; a gRPC stream's are, by its tracked body).
        ticket.set_actual_from_head(|name| response.headers().get(name).map(http::HeaderValue::as_bytes));
    }
    // Held by the body until it has gone (a tracked body's ticket keeps its own).
    let in_flight = if matches!(grpc, Grpc::Trailers) { None } else { ticket.take_in_flight() };
    match grpc {
        Grpc::No => {
            // Billed at the head, as every response; stored when its body has gone (not
            // billed: the capture's drop releases the key).
            let billed = ticket.complete(status);
            match capture.filter(|_| billed) {
                Some(capture) if capture.has_rest() => {
                    Err(Box::new(Draining { response, capture, deadline: None, in_flight }))
                }
                Some(capture) => Ok(with_capture(response, capture, in_flight)),
                None => Ok(response.map(|body| TollgateBody::counted(body, in_flight))),
            }
        }
        Grpc::Status(code) => {
            ticket.complete_grpc(code);
            Ok(response.map(|body| TollgateBody::counted(body, in_flight)))
        }
        Grpc::Trailers if response.body().is_end_stream() => {
            ticket.complete(status);
            Ok(response.map(TollgateBody::inner))
        }
        Grpc::Trailers => Ok(response.map(|body| TollgateBody::tracked(body, ticket, status))),
    }
}

impl<S, B, ResBody, P, M> Future for ResponseFuture<S, B, P, M>
where
    M: BodyMode<B>,
    S: Service<Request<M::Body>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes>,
    P: RejectionResponder,
{
    type Output = Result<Response<TollgateBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Pending { resolving, waiting } => {
                    let outcome = ready!(resolving.as_mut().poll(cx));
                    let Waiting { mut inner, mut request, responder, context } = *waiting.take().expect(DONE);
                    match outcome.map(Ticket::into_parts) {
                        Ok((ticket, _)) if ticket.has_key() && ticket.is_replay() => {
                            State::Replay { replay: Some(replaying::<B, P, M>(request, ticket, responder)) }
                        }
                        Ok((mut ticket, units)) => {
                            if context {
                                request.extensions_mut().insert(ticket.context_with(units));
                            }
                            let future = inner.call(hand_on::<B, M>(request, &mut ticket));
                            ticket.service_called();
                            State::Inner { future, ticket: Some(ticket) }
                        }
                        Err(rejection) if rejection.is_shadowed() => {
                            State::Inner { future: inner.call(M::plain_request(request)), ticket: None }
                        }
                        Err(rejection) => {
                            let response = reject_for(&request, &responder, rejection);
                            return Poll::Ready(Ok(response.map(TollgateBody::full)));
                        }
                    }
                }
                StateProj::Inner { future, ticket } => {
                    // Marked while the service runs: a panic in it leaves the mark, and the
                    // ticket then gives its units back instead of billing a cut-off request.
                    if let Some(t) = ticket.as_mut() {
                        t.in_poll = true;
                    }
                    let polled = future.poll(cx);
                    if let Some(t) = ticket.as_mut() {
                        t.in_poll = false;
                    }
                    let result = ready!(polled);
                    let ticket = ticket.take();
                    return Poll::Ready(match result {
                        Ok(mut response) => {
                            // No ticket: an unidentified request shadow mode let through.
                            if let Some(ticket) = ticket {
                                if ticket.has_key() {
                                    // The first request with an `Idempotency-Key` (rare).
                                    match keyed(response, ticket) {
                                        Ok(response) => return Poll::Ready(Ok(response)),
                                        Err(draining) => {
                                            this.state.set(State::Draining { draining: Some(draining) });
                                            continue;
                                        }
                                    }
                                }
                                // Read before tollgate's own headers are added.
                                let grpc = grpc_status(&response);
                                let headers = response.headers_mut();
                                ticket.emit(&mut |field, value| put_header(headers, field, value));
                                let mut ticket = ticket;
                                if ticket.holds() {
                                    return Poll::Ready(Ok(held(response, ticket, grpc)));
                                }
                                // Held by the body until it has gone (a tracked body's ticket
                                // keeps its own).
                                let in_flight = match grpc {
                                    Grpc::Trailers => None,
                                    _ => ticket.take_in_flight(),
                                };
                                if in_flight.is_some() {
                                    return Poll::Ready(Ok(counted(response, ticket, grpc, in_flight)));
                                }
                                if response.extensions().get::<Rejection>().is_some() {
                                    // Refused by tollgate inside the service (a feature
                                    // extractor): not billed, the units go back.
                                    ticket.give_back();
                                } else {
                                    // A gRPC answer is HTTP 200 whatever happened: its status
                                    // says, in its headers or at the end of its body.
                                    let status = response.status().as_u16();
                                    match grpc {
                                        Grpc::No => {
                                            ticket.complete(status);
                                        }
                                        Grpc::Status(code) => {
                                            ticket.complete_grpc(code);
                                        }
                                        // A body that says it has ended is not polled again.
                                        Grpc::Trailers if response.body().is_end_stream() => {
                                            ticket.complete(status);
                                        }
                                        Grpc::Trailers => {
                                            return Poll::Ready(Ok(
                                                response.map(|body| TollgateBody::tracked(body, ticket, status))
                                            ));
                                        }
                                    }
                                }
                            }
                            Ok(response.map(TollgateBody::inner))
                        }
                        // A service error is not billed: its units go back.
                        Err(e) => {
                            if let Some(ticket) = ticket {
                                ticket.give_back();
                            }
                            Err(e)
                        }
                    });
                }
                StateProj::Ready { response } => {
                    return Poll::Ready(Ok(response.take().expect(DONE).map(TollgateBody::full)));
                }
                StateProj::Draining { draining } => {
                    let d = draining.as_mut().expect(DONE);
                    ready!(drain_within(d.capture.request_body(), &mut d.deadline, cx));
                    let Draining { response, capture, in_flight, .. } = *draining.take().expect(DONE);
                    return Poll::Ready(Ok(with_capture(response, capture, in_flight)));
                }
                StateProj::Replay { replay } => {
                    let r = replay.as_mut().expect(DONE);
                    ready!(drain_within(&r.print, &mut r.deadline, cx));
                    let Replaying { print, ticket, parts, responder, .. } = *replay.take().expect(DONE);
                    let response = match ticket.check_replay_body(print.digest()) {
                        Ok(()) => ticket.replay_response(),
                        Err(rejection) => reject_for(&Request::from_parts(parts, ()), &responder, rejection),
                    };
                    return Poll::Ready(Ok(response.map(TollgateBody::full)));
                }
            };
            this.state.set(next);
        }
    }
}
