use bytes::Bytes;
use http::{header, HeaderValue, Response};

use super::Rejection;

/// Turns a [`Rejection`] into a response. Closures `Fn(&Rejection) -> Response<Bytes>` are
/// responders too. The front door adds the rate-limit headers and `Retry-After` afterwards,
/// and puts the rejection in the response extensions.
///
/// ```
/// use bytes::Bytes;
/// use tollgate::{Rejection, RejectionResponder};
/// let plain = |r: &Rejection| {
///     http::Response::builder().status(r.status()).body(Bytes::from(r.detail().to_owned())).unwrap()
/// };
/// fn assert_responder<R: RejectionResponder>(_: &R) {}
/// assert_responder(&plain);
/// ```
pub trait RejectionResponder: Clone + Send + Sync + 'static {
    /// Builds the response for `rejection`.
    fn respond(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> RejectionResponder for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Clone + Send + Sync + 'static,
{
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

/// The responder for gRPC requests (the tower layer uses it whenever the request's content type
/// is `application/grpc…`, whatever responder it was given): a trailers-only gRPC response —
/// HTTP 200, `grpc-status` ([`RejectionKind::grpc_code`](super::RejectionKind::grpc_code)) and
/// `grpc-message` (the detail, percent-encoded) — so a gRPC client sees a status it
/// understands. The front door adds `Retry-After` and the rate-limit headers, which the client
/// reads as metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcStatus;

impl RejectionResponder for GrpcStatus {
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        let mut response = Response::new(Bytes::new());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(rejection.kind().grpc_code())));
        let mut message = String::with_capacity(rejection.detail().len());
        for b in rejection.detail().bytes() {
            // The gRPC spec: percent-encode what is not printable ASCII, and '%'.
            if (0x20..=0x7e).contains(&b) && b != b'%' {
                message.push(char::from(b));
            } else {
                message.push_str(&format!("%{b:02X}"));
            }
        }
        if let Ok(value) = HeaderValue::from_str(&message) {
            headers.insert("grpc-message", value);
        }
        response
    }
}

/// The default responder: an RFC 9457 `application/problem+json` body, with
/// `WWW-Authenticate` on 401.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

impl RejectionResponder for ProblemJson {
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        let mut response = Response::new(Bytes::from(rejection.problem_json()));
        *response.status_mut() = rejection.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(super::PROBLEM_JSON));
        if let Some(challenge) = rejection.challenge().and_then(|c| HeaderValue::from_str(c).ok()) {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}
