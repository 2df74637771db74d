//! The engine shared by every front door: admission, completion, the usage pipeline.

mod builder;
#[allow(clippy::module_inception)]
mod engine;
mod idempotency;
mod lease;
mod metrics;
mod pipeline;
mod table;
mod ticket;

pub use builder::Builder;
pub use engine::{Admission, PendingAdmission, RequestInfo, Tollgate};
pub(crate) use engine::{Prefetch, RuntimeCache};
pub(crate) use metrics::Metrics;
pub use metrics::Stats;
pub use pipeline::{ExportReport, FlushReport, ShutdownReport};
pub use ticket::Ticket;
