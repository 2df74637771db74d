//! The names every layer shares, at the bottom of the crate: tenant, plan and meter ids, quota
//! periods and modes, API key digests, and what a change of the directory tells the engine.
//!
//! Nothing here imports another module of the crate; the configuration, the stores, billing and
//! the engine all build on it. Users reach these through [`crate::config`] and the crate root.

mod events;
mod ids;
mod key;
mod period;
mod random;

pub use events::{DirectoryEvents, WebhookCount};
pub use ids::{InvalidTenantId, MeterId, PlanId, TenantId};
pub use key::KeyHash;
pub(crate) use key::{check_api_key, COMMA_IN_KEY, MAX_KEY_LEN};
pub use period::{Period, QuotaMode};
pub(crate) use random::draw_u64;

/// The most bytes of one stored `Idempotency-Key` response on DynamoDB (see
/// `store::contract::DYNAMODB_MAX_RESPONSE_BYTES`): here so the configuration can check its
/// limit without importing the stores.
pub(crate) const DYNAMODB_MAX_RESPONSE_BYTES: usize = 350_000;
