//! Why a request was turned away: the kinds every layer names (the responses, the metrics,
//! the engine), here at the bottom so that counting a kind imports nothing above.

use http::StatusCode;

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
    /// A hold could not be taken because other requests of the tenant hold the units it needs
    /// (they are not spent: they come back as those requests settle), or the node has
    /// `limits.max_holds` holds open: 429 with `Retry-After: 1`. It names no policy, and its
    /// `RateLimit` item's `r` is the units not held. Nothing is charged.
    UnitsHeld,
    /// The estimate a route's `hold` reads from a request header does not parse as a whole
    /// number of units, is zero, or is above the hold's `max`: 400. Nothing is charged.
    MalformedHoldEstimate,
    /// The tenant's hard spend cap (money, `spend = { … }`) cannot cover the request's cost,
    /// or its hold's estimated cost, in this period: 402 Payment Required, with
    /// `Retry-After` and `t` at the period's end (a cap belongs to a calendar period). Nothing
    /// is charged.
    SpendCapReached,
    /// A hold larger than the whole of its limit: a hard quota's `limit`, a spend cap's whole
    /// cap, the largest balance a store keeps. No period and no top-up can ever cover it, so
    /// it is not a 429 to retry: 400, without `Retry-After`. Nothing is charged.
    HoldExceedsLimit,
    /// The tenant's other requests kept the quota's store calls busy: on this node past
    /// `usage.queue_timeout` (a queue of its own requests, each waiting for the call ahead of
    /// it), or across the fleet until the call's deadline (other nodes writing the tenant's
    /// row first every time, on a store that writes under a condition); the store answered. On
    /// a quota that fails closed: 429 with `Retry-After: 1`. Not a
    /// store failure: it feeds no breaker (a quota that fails open admits the request as on a
    /// store failure, its units owed). Nothing is charged.
    TenantBusy,
    /// The dimension values of a record or a hold name no series of its meter: a value its
    /// closed list lacks, or a dimension missing, under `on_unknown = "refuse"`, or a
    /// dimension the meter does not have: 400. Nothing is charged.
    InvalidDimension,
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
            RejectionKind::RateLimited
            | RejectionKind::QuotaExceeded
            | RejectionKind::ConcurrencyLimited
            | RejectionKind::UnitsHeld
            | RejectionKind::TenantBusy => StatusCode::TOO_MANY_REQUESTS,
            RejectionKind::MissingCredentials | RejectionKind::UnknownCredentials => StatusCode::UNAUTHORIZED,
            RejectionKind::MalformedCredentials
            | RejectionKind::MalformedIdempotencyKey
            | RejectionKind::MalformedPath
            | RejectionKind::MalformedHoldEstimate
            | RejectionKind::HoldExceedsLimit
            | RejectionKind::InvalidDimension => StatusCode::BAD_REQUEST,
            RejectionKind::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            RejectionKind::CreditsExhausted | RejectionKind::SpendCapReached => StatusCode::PAYMENT_REQUIRED,
            RejectionKind::IdempotencyKeyInUse => StatusCode::CONFLICT,
            RejectionKind::IdempotencyKeyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            RejectionKind::FeatureNotInPlan => StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status code a gRPC client gets for it: `RESOURCE_EXHAUSTED` (8) for 429 and
    /// 402,
    /// `UNAUTHENTICATED` (16) for 401, `INVALID_ARGUMENT` (3) for 400 (`OUT_OF_RANGE` (11) for
    /// a hold larger than its limit), `UNAVAILABLE` (14) for 503, `ABORTED` (10) for 409,
    /// `FAILED_PRECONDITION` (9) for 422, `PERMISSION_DENIED` (7) for 403.
    #[must_use]
    pub fn grpc_code(self) -> u8 {
        match self {
            RejectionKind::RateLimited
            | RejectionKind::QuotaExceeded
            | RejectionKind::CreditsExhausted
            | RejectionKind::SpendCapReached
            | RejectionKind::ConcurrencyLimited
            | RejectionKind::UnitsHeld
            | RejectionKind::TenantBusy => 8,
            RejectionKind::MissingCredentials | RejectionKind::UnknownCredentials => 16,
            RejectionKind::MalformedCredentials
            | RejectionKind::MalformedIdempotencyKey
            | RejectionKind::MalformedPath
            | RejectionKind::MalformedHoldEstimate
            | RejectionKind::InvalidDimension => 3,
            RejectionKind::StoreUnavailable => 14,
            RejectionKind::IdempotencyKeyInUse => 10,
            RejectionKind::IdempotencyKeyMismatch => 9,
            RejectionKind::FeatureNotInPlan => 7,
            RejectionKind::HoldExceedsLimit => 11,
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
            RejectionKind::UnitsHeld => "Units held",
            RejectionKind::MalformedHoldEstimate => "Malformed hold estimate",
            RejectionKind::SpendCapReached => "Spend cap reached",
            RejectionKind::HoldExceedsLimit => "Hold larger than the limit",
            RejectionKind::InvalidDimension => "Invalid dimension",
            RejectionKind::TenantBusy => "Tenant busy",
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
            RejectionKind::UnitsHeld => docs!("UnitsHeld"),
            RejectionKind::MalformedHoldEstimate => docs!("MalformedHoldEstimate"),
            RejectionKind::SpendCapReached => docs!("SpendCapReached"),
            RejectionKind::HoldExceedsLimit => docs!("HoldExceedsLimit"),
            RejectionKind::InvalidDimension => docs!("InvalidDimension"),
            RejectionKind::TenantBusy => docs!("TenantBusy"),
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
            RejectionKind::UnitsHeld => "units_held",
            RejectionKind::MalformedHoldEstimate => "malformed_hold_estimate",
            RejectionKind::SpendCapReached => "spend_cap_reached",
            RejectionKind::HoldExceedsLimit => "hold_exceeds_limit",
            RejectionKind::InvalidDimension => "invalid_dimension",
            RejectionKind::TenantBusy => "tenant_busy",
        }
    }

    pub(crate) const ALL: [RejectionKind; 19] = [
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
        RejectionKind::UnitsHeld,
        RejectionKind::MalformedHoldEstimate,
        RejectionKind::SpendCapReached,
        RejectionKind::HoldExceedsLimit,
        RejectionKind::TenantBusy,
        RejectionKind::InvalidDimension,
    ];
}
