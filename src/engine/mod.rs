//! The engine shared by every front door: admission, completion, the usage pipeline.

mod builder;
mod directory;
#[allow(clippy::module_inception)]
mod engine;
mod export;
mod flush;
mod idempotency;
mod lease;
mod lifecycle;
mod metrics;
mod table;
mod ticket;

pub use builder::Builder;
pub use engine::{Admission, PendingAdmission, RequestInfo, Tollgate};
pub(crate) use engine::{Prefetch, RuntimeCache};
pub use export::ExportReport;
pub use flush::FlushReport;
pub use lifecycle::{ShutdownError, ShutdownReport};
pub(crate) use metrics::Metrics;
pub use metrics::Stats;
pub use ticket::Ticket;
