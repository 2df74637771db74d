//! Usage: the quota leases of tenants and their thresholds, units taken and given back
//! ([`Taken`](taken::Taken)), holds of units while work runs, usage events of jobs and queues,
//! the pipeline that flushes usage to the store, the expiry of prepaid credits, and the tenants' own usage views. The part
//! is [`Units`](units::Units) (`units.rs`); handlers reach it through their
//! [`TenantContext`](context::TenantContext).

pub(crate) mod context;
pub(crate) mod credits;
pub(crate) mod events;
pub(crate) mod flush;
pub(crate) mod held;
pub(crate) mod hold;
pub(crate) mod lease;
pub(crate) mod spend;
pub(crate) mod taken;
pub(crate) mod tally;
pub(crate) mod thresholds;
pub(crate) mod units;
pub(crate) mod views;
