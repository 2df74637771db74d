//! The engine shared by every front door: admission, completion, the usage pipeline.

mod admission;
mod builder;
pub(crate) mod clients;
mod directory;
mod door;
#[allow(clippy::module_inception)]
mod engine;
pub(crate) mod events;
mod export;
mod flush;
mod idempotency;
mod lease;
mod lifecycle;
mod report;
mod table;
mod ticket;
mod wait;

pub(crate) use builder::open_store;
pub use builder::{BuildError, Builder};
pub(crate) use door::{credential_in, describe, REPEATED_KEY};
pub use door::{ClientAddr, FrontDoor, RequestView};
pub use engine::{Admission, PendingAdmission, RequestInfo, Tollgate};
pub(crate) use engine::{Prefetch, RuntimeCache};
pub(crate) use events::ProcessedAs;
pub use export::ExportReport;
pub use flush::FlushReport;
pub use lifecycle::{ShutdownError, ShutdownReport};
pub use report::{QuotaUsage, ReportError, UsageReport, WindowUsage};

/// A tenant crossed a threshold of a quota (`usage.notify_at`): given to the
/// [`on_threshold`](Builder::on_threshold) hook, once per threshold, quota and period on a
/// node. Measured by the units the fleet has reserved, as the store said on this node's last
/// lease refill: a threshold is seen within a lease of the moment usage reaches it (leases
/// held by other nodes count as used).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThresholdCrossed {
    /// The tenant.
    pub tenant: crate::config::TenantId,
    /// Its plan.
    pub plan: crate::config::PlanId,
    /// The quota's meter.
    pub meter: crate::config::MeterId,
    /// The quota's period.
    pub period: crate::config::Period,
    /// The period's start (Unix seconds).
    pub start: i64,
    /// The period's end.
    pub end: i64,
    /// The quota's limit.
    pub limit: u64,
    /// Hard or soft.
    pub mode: crate::config::QuotaMode,
    /// The threshold crossed, in percent of the limit.
    pub percent: u16,
    /// The units the fleet had reserved then.
    pub reserved: u64,
}

/// The thresholds notified for a tenant's quota: of which period and limit, which percentages.
pub(crate) struct Marks {
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) limit: u64,
    pub(crate) done: Vec<u16>,
}

/// The threshold hook.
pub(crate) type ThresholdHook = std::sync::Arc<dyn Fn(&ThresholdCrossed) + Send + Sync>;
pub use ticket::Ticket;
