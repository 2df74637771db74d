//! The engine shared by every front door: admission, completion, the usage pipeline.

mod admit;
pub(crate) mod alerts;
mod builder;
#[allow(clippy::module_inception)]
mod engine;
mod export;
mod lifecycle;
mod node;
mod rates;
mod report;
mod shared;
mod store_calls;
pub(crate) mod usage;
mod worker;

pub use admit::capture::{is_stored_header, BodyPrint, ResponseCapture, DRAIN_LIMIT};
pub(crate) use admit::door::credential_by;
pub use admit::door::{replay_response, ClientAddr, FrontDoor, RequestView};
pub use alerts::{AlertReport, EndpointError};
pub(crate) use builder::OpenStores;
pub use builder::{BuildError, Builder};
pub(crate) use engine::RuntimeCache;
pub use engine::{Admission, PendingAdmission, RequestInfo, Tollgate};
pub use export::exporter::ExportReport;
pub use export::reconcile::{Drift, DriftAction, ReconcileError, ReconcileReport, ReconcileRequest};
pub use lifecycle::{ShutdownError, ShutdownReport};
pub use report::{QuotaUsage, ReportError, UsageReport, WindowUsage};
pub(crate) use shared::Prefetch;
pub use usage::caps::{CapError, SpendCapView};
pub use usage::credits::CreditExpiryReport;
pub use usage::flush::FlushReport;
pub use usage::hold::Hold;
pub use usage::thresholds::ThresholdCrossed;

pub(crate) use admit::ticket::RouteHeld;
pub use admit::ticket::{InFlight, Ticket};
pub use worker::Worker;
