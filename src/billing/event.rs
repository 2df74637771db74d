use std::fmt;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    base::{CustomerField, SinkKind, SinkLimits},
    config::{MeterAggregation, MeterId, TenantId},
};

fn is_sum(a: &MeterAggregation) -> bool {
    *a == MeterAggregation::Sum
}

/// One billing meter event: the usage of a tenant on a meter in a closed window, not yet
/// exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MeterEvent {
    /// A deterministic id of (tenant, meter, window, revision): a re-sent event carries the
    /// same id, so the billing system counts it once.
    pub identifier: String,
    /// The billing system's name for the meter (the Stripe meter's `event_name`).
    pub event_name: String,
    /// The tenant.
    pub tenant: TenantId,
    /// The tenant's billing customer, when known.
    pub customer: Option<String>,
    /// The meter.
    pub meter: MeterId,
    /// The start of the window, in Unix seconds.
    pub window_start: i64,
    /// The end of the window (exclusive), in Unix seconds.
    pub window_end: i64,
    /// For a `sum` meter the units not exported before (a later revision carries only the
    /// late delta); for a pre-aggregated meter the window's running total.
    pub value: u64,
    /// 0 for the first export of a window, then 1, 2, … for late usage.
    pub revision: u32,
    /// The event's time, in Unix seconds: the last second of the window for a `sum` meter;
    /// the window's start plus the revision for a pre-aggregated one (so a later revision
    /// is always the newest).
    pub timestamp: i64,
    /// How the billing meter aggregates: for a pre-aggregated meter `value` is the window's
    /// running total, not a delta.
    #[serde(skip_serializing_if = "is_sum")]
    pub aggregation: MeterAggregation,
    /// A series' values (`model` = `m-large`, `kind` = `output`), in the order its meter
    /// declares its dimensions: the billing event's dimensions (Stripe's payload keys a meter
    /// lists in `dimension_payload_keys`, Metronome's properties). Empty for a meter without.
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    pub dimensions: Vec<(String, String)>,
}

fn as_map<S: serde::Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// The deterministic identifier of a meter event in the empty namespace (a store made before
/// identifier namespaces): `tg_` and 40 hex digits of SHA-256(tenant, meter, window start,
/// revision). [`identifier_in`] gives it in a store's namespace.
///
/// ```
/// let a = tollgate::billing::identifier(&"acme".into(), &"requests".into(), 3600, 0);
/// assert_eq!(a, tollgate::billing::identifier(&"acme".into(), &"requests".into(), 3600, 0));
/// assert_ne!(a, tollgate::billing::identifier(&"acme".into(), &"requests".into(), 3600, 1));
/// assert_eq!(a.len(), 43);
/// ```
#[must_use]
pub fn identifier(tenant: &TenantId, meter: &MeterId, window_start: i64, revision: u32) -> String {
    identifier_in("", tenant, meter, window_start, revision)
}

/// The identifier of a meter event in `namespace`
/// ([`ExportStore::identifier_namespace`](crate::store::ExportStore::identifier_namespace)):
/// two stores with their own namespaces never send one identifier, and the empty namespace
/// gives [`identifier`].
///
/// ```
/// use tollgate::billing::{identifier, identifier_in};
/// let (t, m) = (&"acme".into(), &"requests".into());
/// assert_eq!(identifier_in("", t, m, 3600, 0), identifier(t, m, 3600, 0));
/// assert_ne!(identifier_in("9f3a", t, m, 3600, 0), identifier(t, m, 3600, 0));
/// assert_eq!(identifier_in("9f3a", t, m, 3600, 0).len(), 43);
/// ```
#[must_use]
pub fn identifier_in(namespace: &str, tenant: &TenantId, meter: &MeterId, window_start: i64, revision: u32) -> String {
    let mut h = Sha256::new();
    for part in [tenant.as_str().as_bytes(), meter.as_str().as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(window_start.to_be_bytes());
    h.update(revision.to_be_bytes());
    if !namespace.is_empty() {
        h.update((namespace.len() as u64).to_be_bytes());
        h.update(namespace.as_bytes());
    }
    let digest = h.finalize();
    format!("tg_{}", &hex::encode(digest)[..40])
}

/// Why a billing sink did not take an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Worth retrying later (408, 409, 429, a 5xx): the event is sent again, with the same
    /// identifier and parameters, after a backoff with jitter (or `retry_after`, if longer).
    #[error("temporary billing sink error: {source}")]
    Retryable {
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// How long the billing system asked to wait, if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// Not taken, and certainly so: the billing system refused the call without executing it
    /// (429 rate limited, 409 a concurrent request), or the request never left this machine
    /// (a refused connection, a failed name lookup, a failed TLS handshake). Retried after a
    /// backoff without limit; the export does not count as sent, so it is never parked as
    /// unconfirmed for it.
    #[error("billing sink did not take the event: {source}")]
    NotTaken {
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// How long the billing system asked to wait, if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// Failed without a status to judge by (a dropped connection, a timeout, an error body
    /// that is not the billing system's): retried like [`Retryable`](Self::Retryable) up to
    /// `export.max_unknown_failures` attempts, then dead-lettered.
    #[error("billing sink failed without a status: {0}")]
    Unknown(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Refused in a way that says nothing of what the billing system holds (Stripe's 400
    /// `idempotency_error`: the identifier's key was used with other parameters, by a restored
    /// backup or another deployment): parked for reconciliation, never requeued by
    /// `tollgate export --requeue-all`, since a re-send under a new identifier could bill it
    /// twice.
    #[error("billing sink answered without settling the event: {0}")]
    Unsettled(String),
    /// The billing system holds an event under this identifier already (Stripe's 400 "An
    /// event already exists with identifier …"). Identifiers are unique per store namespace,
    /// so in a store with a namespace it was this revision's, sent before: marked exported. In
    /// the empty namespace (a store made before namespaces, which another deployment may
    /// share) it proves nothing of this revision: parked for reconciliation.
    #[error("billing system holds the event already: {0}")]
    AlreadyHeld(String),
    /// Refused for good (another 4xx, such as an unknown customer): the aggregate is
    /// dead-lettered, logged, counted and listed.
    #[error("billing sink refused the event: {0}")]
    Permanent(String),
    /// The sink refuses every call (its credentials were refused: 401, 403): the export
    /// pass stops, this event is tried again later, nothing is dead-lettered.
    #[error("billing sink refuses every call: {0}")]
    Halt(String),
}

impl SinkError {
    /// A [`Retryable`](Self::Retryable) error without a requested delay.
    pub fn retryable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Retryable { source: source.into(), retry_after: None }
    }
}

/// What a billing system holds per (dimension values, hour's start): see
/// [`BillingSink::held_by_hour_and_values`].
pub type HeldByValues = std::collections::BTreeMap<(Vec<String>, i64), f64>;

/// Where meter events go: Stripe Billing Meters, Metronome, or a JSON-lines file
/// ([`JsonlSink`](super::JsonlSink)).
///
/// Implementations must treat [`MeterEvent::identifier`] as an idempotency key: the same
/// event may be sent again after a crash.
#[async_trait]
pub trait BillingSink: Send + Sync + fmt::Debug + 'static {
    /// Sends one event.
    async fn send(&self, event: &MeterEvent) -> Result<(), SinkError>;

    /// Sends up to [`SinkLimits::max_batch`] events in one call, all taken or none: the error
    /// is the call's, for every event in it. A [`Permanent`](SinkError::Permanent) refusal of
    /// several events is bisected by the exporter, the halves sent again under the same
    /// identifiers, until the refused event is found and dead-lettered alone.
    ///
    /// The default takes one event ([`send`](Self::send)) and refuses more as
    /// [`Permanent`](SinkError::Permanent), so the exporter's bisection sends them one by one:
    /// a sink whose [`limits`](Self::limits) allow batches must implement this.
    async fn send_batch(&self, events: &[MeterEvent]) -> Result<(), SinkError> {
        match events {
            [] => Ok(()),
            [one] => self.send(one).await,
            _ => Err(SinkError::Permanent(format!(
                "{self:?} takes one event a call: a sink with max_batch above 1 implements send_batch"
            ))),
        }
    }

    /// What the billing system takes. [`SinkLimits::STRIPE`] by default.
    fn limits(&self) -> SinkLimits {
        SinkKind::Stripe.limits()
    }

    /// Which of a tenant's billing customers its events carry. The Stripe customer by default.
    fn customer_field(&self) -> CustomerField {
        SinkKind::Stripe.customer_field()
    }

    /// Whether events need a billing customer: if so, windows of tenants without one are
    /// not billable and skipped (counted, not sent). `false` by default (a file of what
    /// would be billed lists every tenant).
    fn needs_customer(&self) -> bool {
        false
    }

    /// Whether [`held_by_hour`](Self::held_by_hour) reads the billing system back, so that
    /// reconciliation can compare anything. `false` by default (Metronome, a file): the
    /// engine says so once at build, and its worker's reconciliation compares nothing.
    fn reads_back(&self) -> bool {
        false
    }

    /// What the billing system holds for `customer` on the meter named `event_name`, hour by
    /// hour from `from` to `to` (Unix seconds, whole hours): each hour's start with the sum of
    /// the values it counts there; an hour absent holds nothing. What
    /// [reconciliation](crate::Tollgate::reconcile) compares the store's ledger with.
    ///
    /// `Ok(None)`, the default, says this sink cannot be read back (a file): nothing is
    /// compared.
    ///
    /// # Errors
    /// The billing system's error, classified as for [`send`](Self::send).
    async fn held_by_hour(
        &self,
        event_name: &str,
        customer: &str,
        from: i64,
        to: i64,
    ) -> Result<Option<std::collections::BTreeMap<i64, f64>>, SinkError> {
        let _ = (event_name, customer, from, to);
        Ok(None)
    }

    /// Whether [`held_by_hour_and_values`](Self::held_by_hour_and_values) reads the billing
    /// system back per combination of a meter's dimension values, so that reconciliation
    /// compares each series of a meter with dimensions on its own. `false` by default: each
    /// hour of a meter is compared as the total of its series.
    fn reads_back_by_values(&self) -> bool {
        false
    }

    /// What the billing system holds for `customer` on the meter named `event_name`, hour by
    /// hour from `from` to `to`, per combination of the events' values under the dimension
    /// keys `keys`: each (the values, in the order of `keys`; the hour's start) with the sum of
    /// the values it counts there. An event without one of the keys counts under an empty
    /// value. Read only when [`reads_back_by_values`](Self::reads_back_by_values) says so.
    ///
    /// `Ok(None)`, the default: it cannot (reconciliation then compares totals).
    ///
    /// # Errors
    /// The billing system's error, classified as for [`send`](Self::send); a
    /// [`Permanent`](SinkError::Permanent) one (the grouping refused) makes reconciliation
    /// compare the meter's total, read by [`held_by_hour`](Self::held_by_hour), instead.
    async fn held_by_hour_and_values(
        &self,
        event_name: &str,
        customer: &str,
        keys: &[String],
        from: i64,
        to: i64,
    ) -> Result<Option<HeldByValues>, SinkError> {
        let _ = (event_name, customer, keys, from, to);
        Ok(None)
    }
}
