//! Responses to rejections, for every front door: the responder's body, the rate-limit header
//! fields, the rejection in the extensions.

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};

use super::{Field, Rejection, RejectionResponder, Value};

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
/// gRPC status ([`GrpcStatus`](super::GrpcStatus)) whatever the responder, as the
/// tower layer answers. For front doors that do not see an [`http::Request`].
pub fn respond_for<P: RejectionResponder>(
    content_type: Option<&[u8]>,
    responder: &P,
    rejection: Rejection,
) -> Response<bytes::Bytes> {
    if content_type.is_some_and(|v| v.starts_with(b"application/grpc")) {
        respond(&super::GrpcStatus, rejection)
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

pub(crate) static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static PAST_DUE: HeaderName = HeaderName::from_static("tollgate-past-due");

#[inline]
pub(crate) fn put_header(headers: &mut HeaderMap, field: Field, value: Value<'_>) {
    let name = match field {
        Field::RateLimitPolicy => &RATELIMIT_POLICY,
        Field::RateLimit => &RATELIMIT,
        Field::RetryAfter => &http::header::RETRY_AFTER,
        Field::XRateLimitLimit => &X_LIMIT,
        Field::XRateLimitRemaining => &X_REMAINING,
        Field::XRateLimitReset => &X_RESET,
        Field::PastDue => &PAST_DUE,
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
