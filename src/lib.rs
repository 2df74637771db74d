#![doc = include_str!("../docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
mod base;
pub mod billing;
pub mod clock;
pub mod config;
#[cfg(feature = "dashboard")]
#[cfg_attr(docsrs, doc(cfg(feature = "dashboard")))]
pub mod dashboard;
pub mod door {
    //! For authors of a new front door (a framework's middleware over the engine): a request
    //! as the engine sees it, the engine's answer, and the ticket that completes an admitted
    //! request. The tower layer, `tollgate-actix` and `tollgate-lambda` are built on these;
    //! the [architecture guide](crate::guide::architecture) describes the fast path they share.
    pub use crate::engine::{
        is_stored_header, replay_response, Admission, BodyPrint, ClientAddr, FrontDoor, InFlight, PendingAdmission,
        RequestInfo, RequestView, ResponseCapture, Ticket, DRAIN_LIMIT,
    };
    pub use crate::response::{respond, respond_for};
    pub use crate::store::StoredResponse;
    pub use crate::tenant::Credential;
    /// The most bytes of a body [`Tollgate::tenant_alert_endpoint`](crate::Tollgate::tenant_alert_endpoint)
    /// reads (a longer one is answered 413).
    pub const ALERT_ENDPOINT_MAX_BODY: usize = crate::settings::endpoint::MAX_BODY;
    /// The most bytes of a body [`Tollgate::tenant_spend_cap`](crate::Tollgate::tenant_spend_cap)
    /// reads (a longer one is answered 413).
    pub const SPEND_CAP_MAX_BODY: usize = crate::settings::caps::MAX_BODY;
    /// The most bytes of a body [`Tollgate::tenant_recharge`](crate::Tollgate::tenant_recharge)
    /// reads (a longer one is answered 413).
    pub const RECHARGE_MAX_BODY: usize = crate::settings::recharge::MAX_BODY;
}
pub mod guide {
    //! The guides, from the repository's `docs/` folder: their Rust examples are compiled as
    //! doctests, and the configurations they show are read by the test suite. The guides of the
    //! front doors are in their crates (`tollgate_axum::guide`, `tollgate_actix::guide`,
    //! `tollgate_lambda::guide`).

    #[doc = include_str!("../docs/architecture.md")]
    pub mod architecture {}
    #[doc = include_str!("../docs/configuration.md")]
    pub mod configuration {}
    #[doc = include_str!("../docs/sqlite.md")]
    pub mod sqlite {}
    #[doc = include_str!("../docs/dynamodb.md")]
    pub mod dynamodb {}
    #[doc = include_str!("../docs/postgres.md")]
    pub mod postgres {}
    #[doc = include_str!("../docs/redis.md")]
    pub mod redis {}
    #[doc = include_str!("../docs/stripe.md")]
    pub mod stripe {}
    #[doc = include_str!("../docs/metronome.md")]
    pub mod metronome {}
    #[doc = include_str!("../docs/credits.md")]
    pub mod credits {}
    #[doc = include_str!("../docs/events.md")]
    pub mod events {}
    #[doc = include_str!("../docs/performance.md")]
    pub mod performance {}
    #[doc = include_str!("../docs/alerts.md")]
    pub mod alerts {}
    #[doc = include_str!("../docs/money.md")]
    pub mod money {}
    #[doc = include_str!("../docs/dimensions.md")]
    pub mod dimensions {}
    #[doc = include_str!("../docs/orgs.md")]
    pub mod orgs {}
    #[doc = include_str!("../docs/tiers.md")]
    pub mod tiers {}
    #[doc = include_str!("../docs/usage.md")]
    pub mod usage {}
    #[doc = include_str!("../docs/dashboard.md")]
    pub mod dashboard {}
    #[doc = include_str!("../docs/audit.md")]
    pub mod audit {}
    #[doc = include_str!("../docs/opentelemetry.md")]
    pub mod opentelemetry {}
}
pub mod money {
    //! Money: prices on meters and spend caps, exact decimals ([`Decimal`], never floats),
    //! spend counted in nano-units (10⁻⁹) of `[billing] currency` on the reserved meter
    //! `spend`. The [money guide](crate::guide::money) explains them.
    pub use crate::base::SpendCap;
    pub use crate::base::{amount_of, ceil_nanos, cost_nanos, nanos_of, parse_cap, MAX_CAP_NANOS, NANOS, SPEND_METER};
    pub use crate::config::BillingSettings;
    pub use crate::settings::caps::{CapError, SpendCapView};
    pub use crate::settings::recharge::{RechargeAsk, RechargeError, RechargeView};
    pub use rust_decimal::Decimal;
}
pub mod alerts {
    //! Alerts: threshold crossings (a quota's percentages, units left, a hard limit or a
    //! balance reached) written once per fleet to a durable outbox and delivered as signed
    //! webhooks ([Standard Webhooks](https://www.standardwebhooks.com/)) to the endpoints of
    //! `[alerts]` and to tenants' own. The [alerts guide](crate::guide::alerts) explains them,
    //! with receivers in Rust and Python.
    pub use crate::base::{is_public, signature_header, BadSecret, WebhookSecret};
    pub use crate::config::{AlertEndpoint, AlertSettings, EVENT_TYPES};
    pub use crate::engine::AlertReport;
    pub use crate::settings::endpoint::EndpointError;
}
pub mod events {
    //! Usage from outside a request: events of jobs and queues, each with its own time and
    //! id, recorded at most once per id in the window of its own time and checked against
    //! the hard quotas of its own period ([`Tollgate::record_event`](crate::Tollgate::record_event)).
    //! The [events guide](crate::guide::events) explains them.
    pub use crate::engine::{Event, EventError, QueueMessage, UsageMessage, MAX_AGE};
}
mod engine;
pub mod layer;
mod metrics;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel;
mod plan;
pub mod report {
    //! What the engine's operations report: a flush, an export pass, a reconciliation, a shutdown, a tenant's
    //! usage, a crossed quota threshold, a pass delivering alerts, and the counters of the background paths.
    pub use crate::engine::{
        AlertReport, CreditExpiryReport, Drift, DriftAction, ExportReport, FlushReport, NextTier, QuotaUsage,
        ReconcileError, ReconcileReport, ReconcileRequest, ReportError, ShutdownReport, ThresholdCrossed, TierView,
        UsageReport, WindowUsage,
    };
    pub use crate::metrics::Stats;
}
pub mod response;
mod settings;
pub mod store;
mod tenant;

/// The AWS SDK for DynamoDB that [`store::DynamoStore`] is built on, to build its client with
/// the same version.
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use aws_sdk_dynamodb;
pub use config::Config;
pub use config::Overrun;
pub use engine::Worker;
pub use engine::{BuildError, Builder, Hold, ShutdownError, Tollgate};
pub use engine::{Dimensions, Feature, QuotaStatus, RecordError, TenantContext};
pub use layer::{TenantResolver, TollgateLayer, TollgateService};
pub use response::{Rejection, RejectionKind, RejectionResponder};
pub use tenant::{Caller, Identity};
