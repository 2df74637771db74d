use std::{borrow::Cow, fmt, sync::Arc, time::Duration};

use http::StatusCode;

use super::{emit, Field, HeaderState, Value};
use crate::{config::TenantId, tenant::Tenant};

/// Why a request was turned away.
///
/// Each kind has its own `type` URI in the problem body: the documentation of the variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// The tenant's rate (token bucket) is spent: 429.
    RateLimited,
    /// The tenant's hard quota for the period is spent: 429 (with `Retry-After`, the end of
    /// the period). Also an empty prepaid balance with `limits.balance_status = 429` (without
    /// `Retry-After`).
    QuotaExceeded,
    /// The tenant has its plan's `concurrency` requests in flight on this node already (from
    /// admission to the end of the response body): 429, with `Retry-After: 1`. Nothing is
    /// charged.
    ConcurrencyLimited,
    /// The tenant's prepaid balance on the route's meter is spent: 402 Payment Required,
    /// without `Retry-After` (a top-up restores it, not time). Nothing is charged.
    CreditsExhausted,
    /// No credential identifies the tenant: 401.
    MissingCredentials,
    /// The API key or identity is not in the tenant directory: 401.
    UnknownCredentials,
    /// The credential cannot be read (empty, too long, not visible ASCII): 400.
    MalformedCredentials,
    /// The `Idempotency-Key` header cannot be read: 400.
    MalformedIdempotencyKey,
    /// The store did not answer in time and the plan fails closed: 503.
    StoreUnavailable,
    /// The request with this `Idempotency-Key` is still being processed: 409.
    IdempotencyKeyInUse,
    /// The `Idempotency-Key` was first used for another request (another method, path or
    /// query): 422.
    IdempotencyKeyMismatch,
    /// The route needs a feature the tenant's plan (with its overrides) does not include:
    /// 403. Nothing is charged.
    FeatureNotInPlan,
    /// The path has a dot segment (`.` or `..`, perhaps percent-encoded), which routers serve
    /// differently: 400. Nothing is charged.
    MalformedPath,
}

macro_rules! docs {
    ($variant:literal) => {
        concat!("https://docs.rs/tollgate/latest/tollgate/response/enum.RejectionKind.html#variant.", $variant)
    };
}

impl RejectionKind {
    /// The HTTP status of the response.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            RejectionKind::RateLimited | RejectionKind::QuotaExceeded | RejectionKind::ConcurrencyLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            RejectionKind::MissingCredentials | RejectionKind::UnknownCredentials => StatusCode::UNAUTHORIZED,
            RejectionKind::MalformedCredentials
            | RejectionKind::MalformedIdempotencyKey
            | RejectionKind::MalformedPath => StatusCode::BAD_REQUEST,
            RejectionKind::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            RejectionKind::CreditsExhausted => StatusCode::PAYMENT_REQUIRED,
            RejectionKind::IdempotencyKeyInUse => StatusCode::CONFLICT,
            RejectionKind::IdempotencyKeyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            RejectionKind::FeatureNotInPlan => StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status code a gRPC client gets for it: `RESOURCE_EXHAUSTED` (8) for 429 and
    /// 402,
    /// `UNAUTHENTICATED` (16) for 401, `INVALID_ARGUMENT` (3) for 400, `UNAVAILABLE` (14) for
    /// 503, `ABORTED` (10) for 409, `FAILED_PRECONDITION` (9) for 422, `PERMISSION_DENIED`
    /// (7) for 403.
    #[must_use]
    pub fn grpc_code(self) -> u8 {
        match self {
            RejectionKind::RateLimited
            | RejectionKind::QuotaExceeded
            | RejectionKind::CreditsExhausted
            | RejectionKind::ConcurrencyLimited => 8,
            RejectionKind::MissingCredentials | RejectionKind::UnknownCredentials => 16,
            RejectionKind::MalformedCredentials
            | RejectionKind::MalformedIdempotencyKey
            | RejectionKind::MalformedPath => 3,
            RejectionKind::StoreUnavailable => 14,
            RejectionKind::IdempotencyKeyInUse => 10,
            RejectionKind::IdempotencyKeyMismatch => 9,
            RejectionKind::FeatureNotInPlan => 7,
        }
    }

    /// The HTTP status of the response, as a number (for front doors on another `http`
    /// version, such as actix-web 4).
    #[must_use]
    pub fn status_code(self) -> u16 {
        self.status().as_u16()
    }

    /// A short, human-readable summary that does not change from one occurrence to the next.
    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            RejectionKind::RateLimited => "Rate limit exceeded",
            RejectionKind::QuotaExceeded => "Quota exceeded",
            RejectionKind::CreditsExhausted => "Prepaid credits exhausted",
            RejectionKind::ConcurrencyLimited => "Too many concurrent requests",
            RejectionKind::MissingCredentials => "Missing credentials",
            RejectionKind::UnknownCredentials => "Unknown credentials",
            RejectionKind::MalformedCredentials => "Malformed credentials",
            RejectionKind::MalformedIdempotencyKey => "Malformed Idempotency-Key",
            RejectionKind::StoreUnavailable => "Quota store unavailable",
            RejectionKind::IdempotencyKeyInUse => "Idempotency-Key in use",
            RejectionKind::IdempotencyKeyMismatch => "Idempotency-Key reused",
            RejectionKind::FeatureNotInPlan => "Feature not in plan",
            RejectionKind::MalformedPath => "Malformed path",
        }
    }

    /// The problem type URI.
    #[must_use]
    pub fn problem_type(self) -> &'static str {
        match self {
            RejectionKind::RateLimited => docs!("RateLimited"),
            RejectionKind::QuotaExceeded => docs!("QuotaExceeded"),
            RejectionKind::CreditsExhausted => docs!("CreditsExhausted"),
            RejectionKind::ConcurrencyLimited => docs!("ConcurrencyLimited"),
            RejectionKind::MissingCredentials => docs!("MissingCredentials"),
            RejectionKind::UnknownCredentials => docs!("UnknownCredentials"),
            RejectionKind::MalformedCredentials => docs!("MalformedCredentials"),
            RejectionKind::MalformedIdempotencyKey => docs!("MalformedIdempotencyKey"),
            RejectionKind::StoreUnavailable => docs!("StoreUnavailable"),
            RejectionKind::IdempotencyKeyInUse => docs!("IdempotencyKeyInUse"),
            RejectionKind::IdempotencyKeyMismatch => docs!("IdempotencyKeyMismatch"),
            RejectionKind::FeatureNotInPlan => docs!("FeatureNotInPlan"),
            RejectionKind::MalformedPath => docs!("MalformedPath"),
        }
    }

    /// A stable label for metrics and logs.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            RejectionKind::RateLimited => "rate_limited",
            RejectionKind::QuotaExceeded => "quota_exceeded",
            RejectionKind::CreditsExhausted => "credits_exhausted",
            RejectionKind::ConcurrencyLimited => "concurrency_limited",
            RejectionKind::MissingCredentials => "missing_credentials",
            RejectionKind::UnknownCredentials => "unknown_credentials",
            RejectionKind::MalformedCredentials => "malformed_credentials",
            RejectionKind::MalformedIdempotencyKey => "malformed_idempotency_key",
            RejectionKind::StoreUnavailable => "store_unavailable",
            RejectionKind::IdempotencyKeyInUse => "idempotency_key_in_use",
            RejectionKind::IdempotencyKeyMismatch => "idempotency_key_mismatch",
            RejectionKind::FeatureNotInPlan => "feature_not_in_plan",
            RejectionKind::MalformedPath => "malformed_path",
        }
    }

    pub(crate) const ALL: [RejectionKind; 13] = [
        RejectionKind::RateLimited,
        RejectionKind::QuotaExceeded,
        RejectionKind::CreditsExhausted,
        RejectionKind::ConcurrencyLimited,
        RejectionKind::MissingCredentials,
        RejectionKind::UnknownCredentials,
        RejectionKind::MalformedCredentials,
        RejectionKind::MalformedIdempotencyKey,
        RejectionKind::StoreUnavailable,
        RejectionKind::IdempotencyKeyInUse,
        RejectionKind::IdempotencyKeyMismatch,
        RejectionKind::FeatureNotInPlan,
        RejectionKind::MalformedPath,
    ];
}

/// A request turned away by tollgate. The front doors answer it with a response (never a
/// service error) and put a clone in the response extensions.
#[derive(Clone)]
pub struct Rejection {
    // Boxed: rejections are the exception, and this keeps `Admission` small to move.
    pub(crate) inner: Box<Details>,
}

#[derive(Clone)]
pub(crate) struct Details {
    pub(crate) kind: RejectionKind,
    pub(crate) detail: Cow<'static, str>,
    pub(crate) policy: Option<String>,
    pub(crate) retry_after: Option<u64>,
    pub(crate) tenant: Option<TenantId>,
    /// The tenant's state, for the headers of its policies.
    pub(crate) state: Option<Tenant>,
    pub(crate) headers: HeaderState,
    pub(crate) challenge: Option<Arc<str>>,
    /// Shadow mode lets the request through: it is served without a tenant.
    pub(crate) shadowed: bool,
    /// Answered with the IETF draft's `quota-exceeded` problem type (`limits.headers =
    /// "draft"`, a 429 of the rate, a quota or concurrency).
    pub(crate) quota_exceeded_type: bool,
}

impl Rejection {
    /// Whether shadow mode (`limits.shadow`) lets this request through although it would be
    /// refused (a missing, unknown or malformed credential): a front door serves it, without a
    /// tenant (no ticket, no usage), instead of answering the rejection. The tower layer and
    /// the actix-web middleware do; a front door of your own should too.
    #[must_use]
    pub fn is_shadowed(&self) -> bool {
        self.inner.shadowed
    }

    pub(crate) fn new(kind: RejectionKind, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            inner: Box::new(Details {
                kind,
                detail: detail.into(),
                policy: None,
                retry_after: None,
                tenant: None,
                state: None,
                headers: HeaderState::default(),
                challenge: None,
                shadowed: false,
                quota_exceeded_type: false,
            }),
        }
    }

    /// Why the request was rejected.
    #[must_use]
    pub fn kind(&self) -> RejectionKind {
        self.inner.kind
    }

    /// The response status.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.inner.kind.status()
    }

    /// The response status, as a number (no `http` type: for front doors on another `http`
    /// version, such as actix-web 4).
    #[must_use]
    pub fn status_code(&self) -> u16 {
        self.inner.kind.status_code()
    }

    /// The content type of the default body, [`problem_json`](Self::problem_json).
    #[must_use]
    pub fn content_type(&self) -> &'static str {
        super::PROBLEM_JSON
    }

    /// What happened, for this occurrence.
    #[must_use]
    pub fn detail(&self) -> &str {
        &self.inner.detail
    }

    /// The problem type URI of this rejection's body: with `limits.headers = "draft"`, a 429 of
    /// the rate, a quota or concurrency has the IETF draft's
    /// `https://iana.org/assignments/http-problem-types#quota-exceeded` (its
    /// `violated-policies` name the `RateLimit-Policy` items, and `kind` keeps tollgate's);
    /// every other rejection, and every one under `"draft-compat"`, `"legacy"` or `"none"`,
    /// [`RejectionKind::problem_type`].
    #[must_use]
    pub fn problem_type(&self) -> &'static str {
        if self.inner.quota_exceeded_type {
            QUOTA_EXCEEDED_TYPE
        } else {
            self.inner.kind.problem_type()
        }
    }

    /// The violated policy (`rate`, or `METER-PERIOD` such as `requests-day`), if any.
    #[must_use]
    pub fn policy(&self) -> Option<&str> {
        self.inner.policy.as_deref()
    }

    /// How long to wait before retrying, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after.map(Duration::from_secs)
    }

    /// The tenant, when it was identified.
    #[must_use]
    pub fn tenant(&self) -> Option<&TenantId> {
        self.inner.tenant.as_ref()
    }

    /// The `WWW-Authenticate` challenge of a 401.
    #[must_use]
    pub fn challenge(&self) -> Option<&str> {
        self.inner.challenge.as_deref()
    }

    /// Writes the rate-limit header fields and `Retry-After` of the response through `put`.
    pub fn for_each_header(&self, mut put: impl FnMut(Field, &str)) {
        self.emit(&mut |field, value| put(field, value.as_str()));
    }

    pub(crate) fn emit(&self, put: &mut dyn FnMut(Field, Value<'_>)) {
        match &self.inner.state {
            Some(state) => emit(&state.plan, &self.inner.headers, self.inner.retry_after, Some(state), put),
            None => {
                if let Some(secs) = self.inner.retry_after {
                    put(Field::RetryAfter, Value::Borrowed(itoa::Buffer::new().format(secs)));
                }
            }
        }
    }

    /// The RFC 9457 `application/problem+json` body.
    ///
    /// Members: `type`, `title`, `status`, `detail`, and when they apply `policy` (the violated
    /// policy) and `retry_after` (seconds).
    #[must_use]
    pub fn problem_json(&self) -> Vec<u8> {
        let mut body = serde_json::json!({
            "type": self.problem_type(),
            "title": self.inner.kind.title(),
            "status": self.status().as_u16(),
            "detail": self.inner.detail,
        });
        if self.inner.quota_exceeded_type {
            // The draft's members, and tollgate's kind beside them.
            body["violated-policies"] = serde_json::json!(self.inner.policy.as_deref().into_iter().collect::<Vec<_>>());
            body["kind"] = self.inner.kind.label().into();
        }
        if let Some(policy) = &self.inner.policy {
            body["policy"] = policy.as_str().into();
        }
        if let Some(secs) = self.inner.retry_after {
            body["retry_after"] = secs.into();
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("kind", &self.inner.kind)
            .field("detail", &self.inner.detail)
            .field("policy", &self.inner.policy)
            .field("retry_after", &self.inner.retry_after)
            .field("tenant", &self.inner.tenant)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.kind.title(), self.inner.detail)
    }
}

/// The problem type of ratelimit-headers draft-10 for requests past a quota policy.
pub(crate) const QUOTA_EXCEEDED_TYPE: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Why a repeated API key header is refused; a key with a comma (a repeated header joined by
/// a proxy) gets the same answer.
pub(crate) const REPEATED_KEY: &str =
    "the API key header is repeated (or has a comma, as a proxy joins repeated values)";
/// Why a repeated `Idempotency-Key` header is refused; a key with a comma likewise.
pub(crate) const REPEATED_IDEMPOTENCY_KEY: &str =
    "the Idempotency-Key header is repeated (or has a comma, as a proxy joins repeated values)";
