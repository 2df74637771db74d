//! Usage: the quota leases of tenants and their thresholds, holds of units while work runs, usage events of jobs and queues,
//! the pipeline that flushes usage to the store, and the expiry of prepaid credits.

pub(crate) mod caps;
pub(crate) mod credits;
pub(crate) mod events;
pub(crate) mod flush;
pub(crate) mod held;
pub(crate) mod hold;
pub(crate) mod lease;
pub(crate) mod record;
pub(crate) mod spend;
pub(crate) mod thresholds;
