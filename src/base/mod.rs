//! The names every layer shares, at the bottom of the crate: tenant, plan and meter ids, quota
//! periods and modes, API key digests, money, what a change of the directory tells the engine, and
//! the billing sinks' facts.
//!
//! Nothing here imports another module of the crate; the configuration, the stores, billing and
//! the engine all build on it. Users reach these through [`crate::config`] and the crate root.

mod events;
mod ids;
mod key;
mod money;
mod period;
mod random;
mod rejection;
mod signing;
mod sink;
#[cfg(feature = "otel")]
pub(crate) mod trace;

pub use events::{DirectoryEvents, RechargeNews, TierNews, Told, WebhookCount};
pub(crate) use ids::policy_name;
pub use ids::{InvalidTenantId, MeterId, OrgId, PlanId, TenantId};
pub(crate) use key::{check_api_key, issued_shape, key_check, COMMA_IN_KEY, ISSUED_KEY_LEN, KEY_ALPHABET, MAX_KEY_LEN};
pub use key::{KeyHash, KeyScope, KeyScopes};
#[cfg(feature = "dashboard")]
pub(crate) use money::minor_digits;
pub use money::{
    amount_of, ceil_nanos, cost_nanos, nanos_of, parse_cap, SpendCap, Standing, MAX_CAP_NANOS, NANOS, SPEND_METER,
};
pub(crate) use money::{header_scale, minor_units_of, money_text, HEADER_INTEGER_MAX};
pub(crate) use period::ENDED_PERIODS_KEPT_SECS;
pub use period::{Period, QuotaMode};
pub(crate) use random::draw_u64;
pub use rejection::RejectionKind;
#[cfg(any(feature = "stripe", feature = "dashboard"))]
pub(crate) use signing::hmac_sha256;
pub(crate) use signing::is_loopback;
pub use signing::{is_public, signature_header, BadSecret, WebhookSecret};
pub use sink::{CustomerField, RefundAttribution, SinkKind, SinkLimits};

/// The most bytes of one stored `Idempotency-Key` response on DynamoDB (see
/// `store::contract::DYNAMODB_MAX_RESPONSE_BYTES`): here so the configuration can check its
/// limit without importing the stores.
pub(crate) const DYNAMODB_MAX_RESPONSE_BYTES: usize = 350_000;

/// The most units a prepaid balance's open grants hold together (see
/// `store::contract::MAX_BALANCE`): here so the configuration, billing and `Admin` check
/// grants without importing the stores.
pub(crate) const MAX_BALANCE: u64 = 1 << 50;

/// The most units a quota lease holds (and the largest debt one carries: a lease word keeps a
/// signed 48-bit count): a hold or a route's hold estimate larger than this is refused. Here so
/// the configuration checks estimates without importing the tenants' state.
pub(crate) const LEASE_MAX: u64 = (1 << 46) - 1;

/// The longest dimension name or value, in bytes.
pub const MAX_DIMENSION_LEN: usize = 64;

/// The most values of a meter's open dimension a tenant may use in a month (`max_values`): the
/// quota role keeps them as one row (about 65 KB at the most, under DynamoDB's 400 KB item).
pub const MAX_OPEN_VALUES: u32 = 1_000;

/// Whether `value` is a dimension's value: 1 to [`MAX_DIMENSION_LEN`] bytes of ASCII letters,
/// digits, `-`, `_` and `.` (a Stripe payload value, a Prometheus label value, a key part of
/// every store, never an escape or a separator).
pub(crate) fn is_dimension_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_DIMENSION_LEN
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
