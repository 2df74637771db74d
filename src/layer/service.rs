use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tower_service::Service;

use super::{future::ResponseFuture, FromConfig, TenantResolver};
use crate::{
    engine::{describe, Admission, FrontDoor, RequestInfo, Tollgate},
    response::{Field, ProblemJson, Rejection, RejectionResponder, Value},
};

/// The service made by [`TollgateLayer`](super::TollgateLayer).
///
/// `poll_ready` only forwards to the inner service; the decision is made in `call`, and a
/// rejection is a response with `type Error = S::Error`.
#[derive(Debug, Clone)]
pub struct TollgateService<S, R = FromConfig, P = ProblemJson> {
    inner: S,
    door: FrontDoor,
    resolver: R,
    responder: P,
    context: bool,
}

impl<S, R, P> TollgateService<S, R, P> {
    pub(crate) fn new(inner: S, tollgate: Tollgate, resolver: R, responder: P, context: bool) -> Self {
        Self { inner, door: tollgate.front_door(), resolver, responder, context }
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

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

impl<S, B, ResBody, R, P> Service<Request<B>> for TollgateService<S, R, P>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    R: TenantResolver<B>,
    P: RejectionResponder,
{
    type Response = Response<super::TollgateBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, P>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let resolver = &self.resolver;
        let admission = self.door.admit_raw(
            |rt| {
                let info = RequestInfo::new(
                    request.method().as_str(),
                    request.uri().path(),
                    resolver.resolve(&request, &rt.config.identify),
                );
                describe(info, request.uri().query(), rt.honours_idempotency_method(request.method()), || {
                    request.headers().get_all(&IDEMPOTENCY_KEY).iter().map(HeaderValue::as_bytes)
                })
            },
            // Read only for a request served as the anonymous tenant (limited per address).
            |rt| {
                rt.client_ip(request.extensions().get::<crate::door::ClientAddr>().map(|a| a.0), |name| {
                    request.headers().get_all(name).iter().map(HeaderValue::as_bytes)
                })
            },
        );
        match admission {
            Admission::Admitted(ticket) => {
                if self.context {
                    request.extensions_mut().insert(ticket.context());
                }
                ResponseFuture::inner(inner.call(request), ticket)
            }
            Admission::Rejected(rejection) if rejection.is_shadowed() => ResponseFuture::passed(inner.call(request)),
            Admission::Rejected(rejection) => ResponseFuture::ready(reject_for(&request, &self.responder, rejection)),
            Admission::Pending(pending) => {
                let tollgate = self.door.engine().clone();
                let resolve = Box::pin(async move { tollgate.resolve(pending).await });
                ResponseFuture::pending(resolve, inner, request, self.responder.clone(), self.context)
            }
        }
    }
}

/// The response to a rejection of `request`: for a gRPC request (by content type) a
/// trailers-only gRPC status, otherwise the responder's; plus rate-limit headers and
/// `Retry-After` (which a gRPC client reads as metadata), plus the rejection in the
/// extensions. Only rejections look at the content type: admitted requests pay nothing.
pub(crate) fn reject_for<B, P: RejectionResponder>(
    request: &Request<B>,
    responder: &P,
    rejection: Rejection,
) -> Response<bytes::Bytes> {
    respond_for(request.headers().get(http::header::CONTENT_TYPE).map(HeaderValue::as_bytes), responder, rejection)
}

/// [`respond`] to a request with this `Content-Type`: for a gRPC request a trailers-only
/// gRPC status ([`GrpcStatus`](crate::response::GrpcStatus)) whatever the responder, as the
/// tower layer answers. For front doors that do not see an [`http::Request`].
pub fn respond_for<P: RejectionResponder>(
    content_type: Option<&[u8]>,
    responder: &P,
    rejection: Rejection,
) -> Response<bytes::Bytes> {
    if content_type.is_some_and(|v| v.starts_with(b"application/grpc")) {
        respond(&crate::response::GrpcStatus, rejection)
    } else {
        respond(responder, rejection)
    }
}

/// The response the tower layer gives to a rejection, for other front doors and handlers that
/// ask the engine themselves: `responder`'s response (such as
/// [`ProblemJson`](crate::response::ProblemJson)), plus the rate-limit header fields and
/// `Retry-After`, with the [`Rejection`] in the response extensions.
pub fn respond<P: RejectionResponder>(responder: &P, rejection: Rejection) -> Response<bytes::Bytes> {
    let mut response = responder.respond(&rejection);
    let headers = response.headers_mut();
    rejection.emit(&mut |field, value| put_header(headers, field, value));
    response.extensions_mut().insert(rejection);
    response
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

#[inline]
pub(crate) fn put_header(headers: &mut HeaderMap, field: Field, value: Value<'_>) {
    let name = match field {
        Field::RateLimitPolicy => &RATELIMIT_POLICY,
        Field::RateLimit => &RATELIMIT,
        Field::RetryAfter => &http::header::RETRY_AFTER,
        Field::XRateLimitLimit => &X_LIMIT,
        Field::XRateLimitRemaining => &X_REMAINING,
        Field::XRateLimitReset => &X_RESET,
    };
    let value = match value {
        // A value of the plan, built once from static bytes: a clone copies two pointers.
        Value::Prebuilt(v) => Ok(v.clone()),
        Value::Borrowed(v) => HeaderValue::from_str(v),
        // No copy: the string's buffer becomes the value's.
        Value::Owned(v) => HeaderValue::try_from(v),
    };
    if let Ok(value) = value {
        headers.insert(name.clone(), value);
    }
}
