//! What clients see: rate-limit headers and RFC 9457 problem bodies.

mod headers;
mod problem;
mod rejection;
mod respond;
pub(crate) mod route;

pub use crate::base::RejectionKind;
pub use headers::Field;
pub(crate) use headers::{emit, HeaderState, Value};
pub use problem::{GrpcStatus, ProblemJson, RejectionResponder};
pub use rejection::Rejection;
pub(crate) use rejection::{REPEATED_IDEMPOTENCY_KEY, REPEATED_KEY};
pub(crate) use respond::{put_header, reject_for, IDEMPOTENT_REPLAYED};
pub use respond::{respond, respond_for};

/// The media type of RFC 9457 problem bodies.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";
