//! The engine shared by every front door: admission, completion, the usage pipeline.

mod admission;
mod builder;
mod capture;
mod charge;
mod clients;
mod credits;
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
mod node;
mod rates;
mod reconcile;
mod record;
mod report;
mod store_calls;
mod table;
mod thresholds;
mod ticket;
mod wait;

pub(crate) use builder::OpenStores;
pub use builder::{BuildError, Builder};
pub use capture::{is_stored_header, BodyPrint, ResponseCapture, DRAIN_LIMIT};
pub use credits::CreditExpiryReport;
pub(crate) use door::credential_by;
pub use door::{replay_response, ClientAddr, FrontDoor, RequestView};
pub use engine::{Admission, PendingAdmission, RequestInfo, Tollgate};
pub(crate) use engine::{Prefetch, RuntimeCache};
pub use export::ExportReport;
pub use flush::FlushReport;
pub use lifecycle::{ShutdownError, ShutdownReport};
pub use reconcile::{Drift, DriftAction, ReconcileError, ReconcileReport, ReconcileRequest};
pub use report::{QuotaUsage, ReportError, UsageReport, WindowUsage};
pub use thresholds::ThresholdCrossed;

pub use ticket::{InFlight, Ticket};
