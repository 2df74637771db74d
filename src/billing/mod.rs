//! Billing: closed usage windows become meter events, sent to a [`BillingSink`] exactly once
//! per (tenant, meter, window, revision).

pub(crate) mod event;
mod jsonl;
#[cfg(feature = "stripe")]
mod metadata;
#[cfg(feature = "metronome")]
mod metronome;
#[cfg(feature = "stripe")]
pub(crate) mod prices;
#[cfg(feature = "stripe")]
mod reader;
#[cfg(feature = "stripe")]
pub(crate) mod recharge;
#[cfg(any(feature = "stripe", feature = "metronome"))]
mod secret;
#[cfg(feature = "stripe")]
mod stripe;
#[cfg(feature = "stripe")]
mod topup;
#[cfg(feature = "stripe")]
mod webhook;

#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub use self::stripe::{StripeSetupError, StripeSink};
pub use crate::base::{CustomerField, SinkLimits};
pub use event::{identifier, identifier_in, BillingSink, HeldByValues, MeterEvent, SinkError};
pub use jsonl::JsonlSink;
#[cfg(feature = "metronome")]
#[cfg_attr(docsrs, doc(cfg(feature = "metronome")))]
pub use metronome::{MetronomeSetupError, MetronomeSink};
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub use recharge::RechargeCharger;
#[cfg(any(feature = "stripe", feature = "metronome"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "stripe", feature = "metronome"))))]
pub use secret::Secret;
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub use webhook::{WebhookHandler, WebhookOutcome, WebhookReply};

/// The grace past due a tenant is in, from its stored subscriptions (`[stripe]
/// past_due_grace`); `None` without the `stripe` feature.
#[allow(unused_variables)]
pub(crate) fn past_due(config: &crate::config::Config, subscriptions: Option<&str>) -> Option<crate::store::PastDue> {
    #[cfg(feature = "stripe")]
    return webhook::past_due(config, subscriptions);
    #[cfg(not(feature = "stripe"))]
    None
}

/// What charges a tenant's recharge: Stripe's, with the secret key.
#[cfg(feature = "stripe")]
pub(crate) type Charger = RechargeCharger;
/// Without Stripe, nothing charges a recharge.
#[cfg(not(feature = "stripe"))]
#[derive(Debug)]
pub(crate) enum Charger {}
#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
pub use {reader::StripeAccess, topup::check_stripe_access};
#[cfg(feature = "stripe")]
pub(crate) use {topup::probe_in_background, webhook::read_secrets};

/// Why the sink the configuration names could not be set up. The sink's own error is kept,
/// to match on:
///
/// ```
/// # #[cfg(feature = "stripe")] {
/// use tollgate::billing::{configured_sink, SinkSetupError, StripeSetupError};
/// let config = tollgate::Config::from_toml_str(
///     "[stripe]\nsecret_key_file = \"/nonexistent/stripe-key\"\n",
/// ).unwrap();
/// let Err(SinkSetupError::Failed(e)) = configured_sink(&config) else { panic!("not set up") };
/// let Some(StripeSetupError::SecretFile { source, .. }) = e.downcast_ref() else { panic!("{e}") };
/// assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkSetupError {
    /// The sink's secret is not set (its environment variable or key file): a process without
    /// it exports nothing, one with it does. The sink's own error, as it said it.
    #[error(transparent)]
    MissingSecret(Box<dyn std::error::Error + Send + Sync>),
    /// This build lacks the sink's cargo feature.
    #[error("export.sink = \"{0}\" but this build has no `{0}` feature")]
    NotBuilt(&'static str),
    /// The sink could not be set up (a secret file that cannot be read, a client that cannot
    /// be built): the sink's own error (for example a `StripeSetupError`, to downcast).
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The billing sink the configuration names: `export.sink` (`"stripe"`, `"metronome"`,
/// `"jsonl"` at `export.file`), else Stripe when there is a `[stripe]` section; `None` when
/// it names none.
///
/// ```
/// let config = tollgate::Config::from_toml_str(
///     "[export]\nsink = \"jsonl\"\nfile = \"usage.jsonl\"\n",
/// )?;
/// let sink = tollgate::billing::configured_sink(&config)?.expect("a sink");
/// assert!(!sink.needs_customer());
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// The sink's secret is missing or unreadable, its client cannot be built, or this build
/// lacks its feature.
pub fn configured_sink(
    config: &crate::config::Config,
) -> Result<Option<std::sync::Arc<dyn BillingSink>>, SinkSetupError> {
    use crate::config::SinkKind;
    let kind = config.export.sink_kind(config.stripe().is_some());
    Ok(Some(match kind {
        None => return Ok(None),
        Some(SinkKind::Jsonl) => {
            let file =
                config.export.file.clone().ok_or_else(|| SinkSetupError::Failed("export.file is not set".into()))?;
            std::sync::Arc::new(JsonlSink::new(file))
        }
        #[cfg(feature = "stripe")]
        Some(SinkKind::Stripe) => std::sync::Arc::new(StripeSink::from_config(config).map_err(|e| match e {
            StripeSetupError::MissingSecret { .. } => SinkSetupError::MissingSecret(Box::new(e)),
            e => SinkSetupError::Failed(Box::new(e)),
        })?),
        #[cfg(feature = "metronome")]
        Some(SinkKind::Metronome) => std::sync::Arc::new(MetronomeSink::from_config(config).map_err(|e| match e {
            MetronomeSetupError::MissingToken => SinkSetupError::MissingSecret(Box::new(e)),
            e => SinkSetupError::Failed(Box::new(e)),
        })?),
        #[allow(unreachable_patterns)]
        Some(other) => return Err(SinkSetupError::NotBuilt(other.as_str())),
    }))
}
