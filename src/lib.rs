#![doc = include_str!("../docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod admin;
pub mod billing;
pub mod clock;
pub mod config;
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
pub use aws_sdk_dynamodb;
pub use config::Config;
pub use engine::{
    Admission, BuildError, Builder, ClientAddr, ExportReport, FlushReport, FrontDoor, PendingAdmission, RequestInfo,
    RequestView, ShutdownError, ShutdownReport, Ticket, Tollgate,
};
pub use layer::{TenantResolver, TollgateLayer, TollgateService};
pub use metrics::Stats;
pub use response::{Rejection, RejectionKind, RejectionResponder};
pub use tenant::{Credential, Identity, KeyHash};
pub use usage::{QuotaStatus, RecordError, TenantContext};
pub use worker::Worker;
