#![doc = include_str!("../docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
mod base;
pub mod billing;
pub mod clock;
pub mod config;
pub mod events {
    //! Usage from outside a request: events of jobs and queues, each with its own time and
    //! id, recorded at most once per id in the window of its own time and checked against
    //! the hard quotas of its own period ([`Tollgate::record_event`](crate::Tollgate::record_event)).
    //! `docs/events.md` is the guide.
    pub use crate::engine::events::{Event, EventError, QueueMessage, UsageMessage, MAX_AGE};
}
mod engine;
pub mod layer;
mod metrics;
pub mod plan;
pub mod response;
pub mod store;
mod tenant;
mod usage;
mod worker;

/// The AWS SDK for DynamoDB that [`store::DynamoStore`] is built on, to build its client with
/// the same version.
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use aws_sdk_dynamodb;
pub use base::KeyHash;
pub use config::Config;
pub use engine::{
    Admission, BuildError, Builder, ClientAddr, ExportReport, FlushReport, FrontDoor, PendingAdmission, QuotaUsage,
    ReportError, RequestInfo, RequestView, ShutdownError, ShutdownReport, ThresholdCrossed, Ticket, Tollgate,
    UsageReport, WindowUsage,
};
pub use layer::{TenantResolver, TollgateLayer, TollgateService};
pub use metrics::Stats;
pub use response::{Rejection, RejectionKind, RejectionResponder};
pub use tenant::{Credential, Identity};
pub use usage::{Feature, QuotaStatus, RecordError, TenantContext};
pub use worker::Worker;
