#![doc = include_str!("../docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
mod base;
pub mod billing;
pub mod clock;
pub mod config;
pub mod door {
    //! For authors of a new front door (a framework's middleware over the engine): a request
    //! as the engine sees it, the engine's answer, and the ticket that completes an admitted
    //! request. The tower layer, `tollgate-actix` and `tollgate-lambda` are built on these;
    //! `docs/architecture.md` describes the fast path they share.
    pub use crate::engine::{Admission, ClientAddr, FrontDoor, PendingAdmission, RequestInfo, RequestView, Ticket};
    pub use crate::tenant::Credential;
}
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
pub mod report {
    //! What the engine's operations report: a flush, an export pass, a shutdown, a tenant's
    //! usage, a crossed quota threshold, and the counters of the background paths.
    pub use crate::engine::{
        ExportReport, FlushReport, QuotaUsage, ReportError, ShutdownReport, ThresholdCrossed, UsageReport, WindowUsage,
    };
    pub use crate::metrics::Stats;
}
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
pub use config::Config;
pub use engine::{BuildError, Builder, ShutdownError, Tollgate};
pub use layer::{TenantResolver, TollgateLayer, TollgateService};
pub use response::{Rejection, RejectionKind, RejectionResponder};
pub use tenant::Identity;
pub use usage::{Feature, QuotaStatus, RecordError, TenantContext};
pub use worker::Worker;
