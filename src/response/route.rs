//! Answers of the small routes tollgate serves to tenants behind its layer (their alert
//! endpoint, their spend cap): JSON, and problem+json refusals.

use bytes::Bytes;
use http::StatusCode;

/// A problem+json answer of `status` (`kind`: its type under `https://tollgate.rs/problems/`).
pub(crate) fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> http::Response<Bytes> {
    let body = serde_json::json!({
        "type": format!("https://tollgate.rs/problems/{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    with_type(status, body.to_string(), super::PROBLEM_JSON)
}

/// A JSON answer of `status`.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> http::Response<Bytes> {
    with_type(status, value.to_string(), "application/json")
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> http::Response<Bytes> {
    let mut response = http::Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

/// The answer of a `DELETE` that removed what it named.
pub(crate) fn no_content() -> http::Response<Bytes> {
    let mut response = http::Response::new(Bytes::new());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// 405 for a method other than `GET`, `PUT` or `DELETE`, naming them in `Allow`.
pub(crate) fn not_get_put_delete() -> http::Response<Bytes> {
    let mut r =
        problem(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed", "GET, PUT or DELETE");
    r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, PUT, DELETE"));
    r
}

/// 405 for a method other than `GET` (or `HEAD`), naming them in `Allow`.
pub(crate) fn not_get() -> http::Response<Bytes> {
    let mut r = problem(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed", "GET or HEAD");
    r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
    r
}

/// 413 for a `PUT` body past `max` bytes (`max` as people read it).
pub(crate) fn too_large(max: &str) -> http::Response<Bytes> {
    problem(StatusCode::PAYLOAD_TOO_LARGE, "bad-request", "Body too large", &format!("at most {max}"))
}
