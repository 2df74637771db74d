//! Billing: closed usage windows become meter events, sent to a [`BillingSink`] exactly once
//! per (tenant, meter, window, revision).

pub(crate) mod event;
mod jsonl;
#[cfg(feature = "stripe")]
mod stripe;
#[cfg(feature = "stripe")]
mod webhook;

#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub use self::stripe::{Secret, StripeSetupError, StripeSink};
pub use event::{identifier, identifier_in, BillingSink, MeterEvent, SinkError};
pub use jsonl::JsonlSink;
#[cfg(feature = "stripe")]
pub(crate) use webhook::read_secrets;
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub use webhook::{WebhookHandler, WebhookOutcome, WebhookReply};
