//! Configuration: plans, meters, routes and tenant identification, read from one TOML file.
//!
//! The file is parsed once into typed values ([`Config`]); nothing at request time looks at
//! strings from the file. Every error names the file, line, column and key path, and unknown
//! keys are errors. The [configuration guide](crate::guide::configuration) explains each table.
//!
//! Each TOML table has a file of its own here, holding the table as written, its validation and
//! the typed settings it gives (`limits.rs`: `[limits]` and [`Limits`]).
//!
//! # Every key
//!
//! `src/config/reference.toml` shows every key tollgate reads, with its default and the values
//! it accepts (a test checks that it names every key, and that the guide names each of them):
//!
#![doc = concat!("```toml\n", include_str!("reference.toml"), "```")]

mod alerts;
mod billing;
mod dashboard;
mod dimensions;
mod document;
mod error;
mod events;
mod export;
mod identify;
mod limits;
mod located;
mod meters;
mod metronome;
pub(crate) mod net;
mod orgs;
mod plans;
mod quota;
mod rate;
mod recharge;
mod route;
mod routes;
mod store;
mod stripe;
mod tenants;
#[cfg(test)]
mod tests;
mod tiers;
mod usage;
mod validator;

pub(crate) use crate::base::{amount_of, ceil_nanos, cost_nanos};
pub use crate::base::{InvalidTenantId, MeterId, OrgId, Period, PlanId, QuotaMode, SinkKind, TenantId};
pub use crate::base::{MAX_CAP_NANOS, NANOS, SPEND_METER};
pub use alerts::{AlertEndpoint, AlertSettings, EVENT_TYPES};
pub use billing::BillingSettings;
pub use dashboard::{DashboardSettings, DashboardToken, MIN_TOKEN_LEN};
pub(crate) use dimensions::{
    parse_selector, selector_id, series_values, truncated as dimensions_truncated, OPEN_POSITION,
};
pub use dimensions::{
    DimensionError, MeterDimensions, OnUnknownValue, MAX_DIMENSIONS, MAX_DIMENSION_LEN, MAX_OPEN_VALUES, OTHER_VALUE,
};
pub use document::Config;
pub use error::{ConfigError, ConfigErrorKind};
pub use events::EventSettings;
pub use export::ExportSettings;
pub use identify::{ClientSettings, Identify, OnUnknown};
pub use limits::{HeaderStyle, Limits};
pub use meters::{MeterAggregation, MeterSpec};
pub use metronome::MetronomeSettings;
pub use net::{ForwardedHeader, IpRange};
pub use orgs::OrgSpec;
pub use plans::{PlanOverride, PlanSpec, Scope};
pub use quota::QuotaSpec;
pub use rate::{Rate, RateError};
pub use recharge::RechargeSpec;
pub(crate) use route::normalize_path;
pub use route::RoutePattern;
pub use routes::{HoldEstimate, HoldSettle, Overrun, RouteHold, RouteSpec, ValueSource};
#[cfg(feature = "redis")]
pub(crate) use store::redis_policy_refused;
pub use store::{Migrate, PostgresSettings, RedisSettings, StoreRole, StoreSettings, Synchronous};
pub use stripe::{CreditSettings, RefundPolicy, StatusOutcome, StripeSettings};
pub use tenants::TenantSpec;
pub(crate) use tenants::ANONYMOUS_TENANT;
pub use tiers::{TierSpec, TierStep};
pub use usage::{StatusSet, UsageSettings};
pub use validator::StoreErrorPolicy;
