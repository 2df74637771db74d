//! What clients see: rate-limit headers and RFC 9457 problem bodies.

mod headers;
mod problem;
mod rejection;

pub use headers::Field;
pub(crate) use headers::{emit, HeaderState, Value};
pub use problem::{GrpcStatus, ProblemJson, RejectionResponder};
pub use rejection::{Rejection, RejectionKind};
pub(crate) use rejection::{REPEATED_IDEMPOTENCY_KEY, REPEATED_KEY};

/// The media type of RFC 9457 problem bodies.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";
