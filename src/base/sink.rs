//! The billing sinks, as the configuration, the exporter and the sinks themselves know them:
//! which one (`[export] sink`), what its billing system takes, and which customer it bills.
//! The one place that says which sink has which limits and customer field.

use std::time::Duration;

/// A billing sink the configuration can name (`[export] sink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SinkKind {
    /// Stripe Billing Meters (`StripeSink`, with `[stripe]`).
    Stripe,
    /// Metronome's `/v1/ingest` (`MetronomeSink`, with `[metronome]`).
    Metronome,
    /// A JSON-lines file (`JsonlSink`, at `export.file`).
    Jsonl,
}

impl SinkKind {
    /// Its name in the configuration.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Stripe => "stripe",
            SinkKind::Metronome => "metronome",
            SinkKind::Jsonl => "jsonl",
        }
    }

    /// What its billing system takes. Without a sink named, [`SinkLimits::default`] (Stripe's).
    #[must_use]
    pub fn limits(self) -> SinkLimits {
        match self {
            SinkKind::Metronome => SinkLimits::METRONOME,
            SinkKind::Stripe | SinkKind::Jsonl => SinkLimits::STRIPE,
        }
    }

    /// Which of a tenant's billing customers it bills. Without a sink named,
    /// [`CustomerField::default`] (the Stripe customer).
    #[must_use]
    pub fn customer_field(self) -> CustomerField {
        match self {
            SinkKind::Metronome => CustomerField::Metronome,
            SinkKind::Stripe | SinkKind::Jsonl => CustomerField::Stripe,
        }
    }

    /// Whether its events need a billing customer (windows of tenants without one are not
    /// billable): a billing system's do, a file of what would be billed does not.
    #[must_use]
    pub fn needs_customer(self) -> bool {
        match self {
            SinkKind::Stripe | SinkKind::Metronome => true,
            SinkKind::Jsonl => false,
        }
    }
}

/// Which of a tenant's billing customers its events are billed to: the one the sink's billing
/// system knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CustomerField {
    /// The Stripe customer id (`stripe_customer`, `TenantRecord::customer`).
    #[default]
    Stripe,
    /// The Metronome customer id or ingest alias (`metronome_customer`,
    /// `TenantRecord::metronome_customer`).
    Metronome,
}

/// What a billing system takes, as its sink tells the exporter: how old an event may be, how
/// long it de-duplicates identifiers, how many events one call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkLimits {
    /// The oldest window the billing system takes, by its last second: older aggregates are
    /// dead-lettered rather than sent.
    pub max_age: Duration,
    /// The longest `export.unconfirmed_after` may be: how long the billing system de-duplicates
    /// a repeated identifier, less a margin. An export unconfirmed longer is parked, never sent
    /// again (the billing system may have forgotten the identifier).
    pub max_unconfirmed: Duration,
    /// The most events one call carries (1: `BillingSink::send` only). A sink above 1 must
    /// implement `BillingSink::send_batch`.
    pub max_batch: usize,
    /// Whether a revision exported later than `[stripe] invoice_grace` after its window is
    /// stamped at export time rather than in its window (Stripe bills usage of a finalized
    /// invoice's period nowhere). Stripe's rule; never without a `[stripe]` section.
    pub restamp_late: bool,
}

impl SinkLimits {
    /// Stripe Billing Meters: meter events up to 35 days old (less an hour's margin),
    /// identifiers de-duplicated for about 24 hours (23 hours kept), one event a call.
    pub const STRIPE: Self =
        Self::new(Duration::from_secs(35 * 86_400 - 3600), Duration::from_secs(23 * 3600), 1).restamping_late();
    /// Metronome: events backdated up to 34 days (less an hour's margin), `transaction_id`
    /// de-duplicated for 34 days (33 kept), up to 100 events a call.
    pub const METRONOME: Self =
        Self::new(Duration::from_secs(34 * 86_400 - 3600), Duration::from_secs(33 * 86_400), 100);

    /// Limits of another billing system. `max_batch` is at least 1. Events keep their
    /// window's time unless [`restamping_late`](Self::restamping_late).
    #[must_use]
    pub const fn new(max_age: Duration, max_unconfirmed: Duration, max_batch: usize) -> Self {
        Self { max_age, max_unconfirmed, max_batch: if max_batch == 0 { 1 } else { max_batch }, restamp_late: false }
    }

    /// With late revisions stamped at export time, as for Stripe ([`restamp_late`](Self::restamp_late)).
    #[must_use]
    pub const fn restamping_late(mut self) -> Self {
        self.restamp_late = true;
        self
    }
}

impl Default for SinkLimits {
    fn default() -> Self {
        Self::STRIPE
    }
}

/// How the money refunded of a payment is shared between its credit lines and its other lines
/// when nothing says which lines were refunded (`[stripe.credits] refund_attribution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RefundAttribution {
    /// `"pro_rata"` (the default): each line gets its share of the payment: the credit lines
    /// `refunded × paid / amount`.
    #[default]
    ProRata,
    /// `"credits_first"`: the refund is taken from the credit lines first, up to what they
    /// cost.
    CreditsFirst,
}
