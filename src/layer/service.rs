use std::{
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use super::{
    future::{hand_on, ResponseFuture},
    request::{BodyMode, SameBody},
    FromConfig, TenantResolver,
};
use crate::{
    engine::{Decision, FrontDoor, Pass, Tollgate, Units},
    response::{reject_for, ProblemJson, RejectionResponder},
};

/// The service made by [`TollgateLayer`](super::TollgateLayer).
///
/// `poll_ready` only forwards to the inner service; the decision is made in `call`, and a
/// rejection is a response with `type Error = S::Error`.
///
/// The inner service receives the request with its body as `M` hands it on: by default
/// ([`SameBody`]) as it came, for bodies that can hold any body of their kind
/// ([`RebuildBody`](super::RebuildBody): axum's, tonic's), a first request with an
/// `Idempotency-Key` having its body fingerprinted as it is read; a
/// [`RequestBody`](super::RequestBody) for any other body ([`Streamed`](super::Streamed)); the
/// body itself, hashed at once, for bodies held whole ([`Buffered`](super::Buffered): Lambda).
#[derive(Debug, Clone)]
pub struct TollgateService<S, R = FromConfig, P = ProblemJson, M = SameBody> {
    inner: S,
    door: FrontDoor,
    resolver: R,
    responder: P,
    context: bool,
    _mode: M,
}

impl<S, R, P, M> TollgateService<S, R, P, M> {
    pub(crate) fn new(inner: S, tollgate: Tollgate, resolver: R, responder: P, context: bool, mode: M) -> Self {
        Self { inner, door: tollgate.front_door(), resolver, responder, context, _mode: mode }
    }

    /// The engine.
    pub fn handle(&self) -> &Tollgate {
        self.door.engine()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// A request with an `Idempotency-Key` (rare): a replay is answered from its stored response,
/// a first request's body is fingerprinted as the inner service reads it.
#[cold]
#[inline(never)]
fn keyed_call<S, B, P, M>(
    mut inner: S,
    mut request: Request<B>,
    mut ticket: Pass,
    responder: &P,
    context: Option<&Arc<Units>>,
) -> ResponseFuture<S, B, P, M>
where
    M: BodyMode<B>,
    S: Service<Request<M::Body>>,
    P: RejectionResponder,
{
    if ticket.is_replay() {
        return ResponseFuture::replay(request, ticket, responder.clone());
    }
    if let Some(units) = context {
        request.extensions_mut().insert(ticket.context_with(units.clone()));
    }
    ResponseFuture::inner(inner.call(hand_on::<B, M>(request, &mut ticket)), ticket)
}

impl<S, B, ResBody, R, P, M> Service<Request<B>> for TollgateService<S, R, P, M>
where
    M: BodyMode<B>,
    S: Service<Request<M::Body>, Response = Response<ResBody>> + Clone,
    ResBody: http_body::Body<Data = bytes::Bytes>,
    R: TenantResolver<B>,
    P: RejectionResponder,
{
    type Response = Response<super::TollgateBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, P, M>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let resolver = &self.resolver;
        let admission = self.door.admit_view(
            &request,
            |identify| resolver.resolve(&request, identify),
            |rt| rt.honours_idempotency_of(request.method()),
        );
        match admission {
            Decision::Admitted(ticket) => {
                // One test for requests without an `Idempotency-Key`.
                if ticket.has_key() {
                    let context = self.context.then(|| self.door.engine().units());
                    return keyed_call::<S, B, P, M>(inner, request, ticket, &self.responder, context);
                }
                if self.context {
                    // Made from the engine's units: the layer's tickets carry none.
                    request.extensions_mut().insert(ticket.context_with(self.door.engine().units().clone()));
                }
                ResponseFuture::inner(inner.call(M::plain_request(request)), ticket)
            }
            Decision::Rejected(rejection) if rejection.is_shadowed() => {
                ResponseFuture::passed(inner.call(M::plain_request(request)))
            }
            Decision::Rejected(rejection) => ResponseFuture::ready(reject_for(&request, &self.responder, rejection)),
            Decision::Pending(pending) => {
                let tollgate = self.door.engine().clone();
                let resolve = Box::pin(async move { tollgate.resolve(pending).await });
                ResponseFuture::pending(resolve, inner, request, self.responder.clone(), self.context)
            }
        }
    }
}
