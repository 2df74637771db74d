//! The engine shared by every front door, as parts that each own their state: admission
//! (`admit/`, the [`Gate`](admit::gate::Gate)), usage (`usage/`, the
//! [`Units`](usage::units::Units)), export (`export/`) and alerts (`alerts/`), over what they
//! all share (`shared.rs`); [`Tollgate`] is the facade that holds them.

mod admit;
pub(crate) mod alerts;
mod builder;
mod door;
#[allow(clippy::module_inception)]
mod engine;
mod export;
mod lifecycle;
mod node;
mod rates;
pub(crate) mod recharge;
mod recharges;
mod record;
mod report;
mod shared;
mod store_calls;
mod table;
mod tenant_routes;
mod tenants;
pub(crate) mod usage;
mod worker;

pub use admit::capture::{is_stored_header, BodyPrint, ResponseCapture, DRAIN_LIMIT};
pub(crate) use admit::stage::Decision;
pub use admit::stage::{Admission, PendingAdmission, RequestInfo};
pub(crate) use admit::ticket::Pass;
pub use admit::ticket::{InFlight, Ticket};
pub use alerts::AlertReport;
pub use builder::{BuildError, Builder};
pub(crate) use builder::{OpenStores, Opened};
pub(crate) use door::{credential_by, values_of};
pub use door::{replay_response, ClientAddr, FrontDoor, RequestView};
pub use engine::Tollgate;
pub use export::exporter::ExportReport;
pub use export::reconcile::{Drift, DriftAction, ReconcileError, ReconcileReport, ReconcileRequest};
pub use lifecycle::{ShutdownError, ShutdownReport};
pub use report::{NextTier, QuotaUsage, ReportError, TierView, UsageReport, WindowUsage};
pub use usage::context::{Dimensions, Feature, QuotaStatus, TenantContext};
pub use usage::credits::CreditExpiryReport;
pub use usage::events::{Event, EventError, QueueMessage, UsageMessage, MAX_AGE};
pub use usage::flush::FlushReport;
pub(crate) use usage::hold::RouteHeld;
pub use usage::hold::{Hold, RecordError};
pub use usage::thresholds::ThresholdCrossed;
pub(crate) use usage::units::Units;
pub use worker::Worker;
