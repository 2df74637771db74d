//! The handler: a delivery verified, read, and sent on to the credits, the plan transitions or
//! the event destination; what it did and the answer to it.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use http::StatusCode;
use stripe_webhook::{Webhook, WebhookError};

use super::{
    destination::{is_thin, thin_event, Destination},
    transition::{json_fields, transition, typed_fields},
    verify::signed_bytes,
};
use crate::{
    billing::{reader::StripeReader, Secret},
    clock::Clock,
    config::{Config, MeterId, PlanId, TenantId},
    store::{
        limited::{Limited, Path, Policy},
        DirectoryEvents, DirectoryStore, QuotaStore, WebhookCount,
    },
};

/// What a webhook delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebhookOutcome {
    /// The tenant moved to this plan (the event id is marked seen in the same write).
    Applied {
        /// The tenant.
        tenant: TenantId,
        /// Its plan now.
        plan: PlanId,
    },
    /// The event id was applied before: nothing changed.
    Duplicate,
    /// A newer event was applied already: for a subscription's event, of that subscription
    /// (`created`, then created < updated < deleted within a second); for another event, for
    /// the customer. Nothing changed.
    Stale,
    /// No tenant of the directory has this customer: nothing changed.
    UnknownCustomer,
    /// The customer is a tenant's declared in the configuration file, whose plan is the
    /// file's: nothing changed (change the plan in the file, or move the tenant to the
    /// store's directory to have webhooks move it). Logged.
    FileTenant {
        /// The tenant.
        tenant: TenantId,
    },
    /// No transition is configured for this event (its type, its subscription status), or
    /// the event names no customer: nothing changed.
    Ignored,
    /// An active subscription whose prices (ids and lookup keys) `[stripe.prices]` does not
    /// map and that gave no plan before (an add-on): the plan is unchanged; the subscription's
    /// event is recorded (its order holds for later events).
    UnknownPrice,
    /// A paid checkout session or invoice granted prepaid units (`[stripe.credits]`), once per
    /// payment: its grant id is the invoice's id, else the payment intent's (never the event's),
    /// so the session and the invoice of one payment grant once.
    Credited {
        /// The tenant.
        tenant: TenantId,
        /// The balance's meter.
        meter: MeterId,
        /// Units granted.
        units: u64,
        /// The grant's id.
        grant: String,
    },
    /// A paid checkout session or invoice none of whose paid lines is on a price of
    /// `[stripe.credits.prices]`, by id or by lookup key (resolved to ids through the API):
    /// nothing granted. Counted (`Stats::webhooks_not_credited`,
    /// `tollgate_webhook_events_total{outcome="not_credited"}`) and logged with the prices the
    /// lines name, so that a credit price the map lacks is seen, never silent. A payment whose
    /// event is also a configured plan transition goes on to it.
    NotCredited {
        /// The price ids of the payment's lines.
        prices: Vec<String>,
    },
    /// A paid invoice (or a subscription's checkout session, which names its invoice alone)
    /// whose payment intent could not be read: there is no Stripe secret key. Nothing granted,
    /// since one payment's shapes could not be told apart by their payment. Counted as
    /// [`NotCredited`](Self::NotCredited) is, and logged; grant by hand once a key is set.
    PaymentUnknown {
        /// The invoice.
        invoice: String,
    },
    /// A refund (`charge.refunded`) of a payment no grant has yet (the grant's event is still
    /// being delivered again): kept by the store, and applied when the grant lands.
    RefundKept {
        /// The payment intent (or invoice).
        payment: String,
    },
    /// A refund (`charge.refunded`) took back the units the refunded money bought, from what
    /// the grant of its payment still held (`[stripe.credits] refunds`).
    Refunded {
        /// The tenant.
        tenant: TenantId,
        /// The balance's meter.
        meter: MeterId,
        /// Units taken back (0: all of it was spent).
        units: u64,
    },
    /// Refused with 400: a missing, malformed, wrong or expired signature, or a body that is
    /// not an event. Nothing changed.
    Rejected(String),
    /// Refused with 413: a body longer than [`WebhookHandler::MAX_BODY`]. Nothing changed.
    TooLarge,
    /// The store failed: 500, so Stripe delivers the event again. Nothing changed.
    StoreFailed(String),
    /// What the event lacks could not be read from Stripe's API (a payment's line items: no
    /// secret key, a timeout, an error): 500, so Stripe delivers the event again. Nothing
    /// changed.
    ApiFailed(String),
    /// A meter error event of Stripe's (a thin event from the event destination, verified with
    /// its secret): Stripe refused meter events after taking them. Logged, counted, and the
    /// hours it names reconciled (a report).
    MeterError {
        /// The event's type: `v1.billing.meter.error_report_triggered` or
        /// `v1.billing.meter.no_meter_found`.
        kind: String,
        /// How many meter events it reports refused (0 when the full event could not be read).
        errors: u64,
    },
}

/// The answer to a webhook delivery: a status and a small JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookReply {
    /// What the delivery did.
    pub outcome: WebhookOutcome,
}

impl WebhookReply {
    /// The HTTP status: 200 for every verified event (applied or not, so Stripe does not
    /// retry what cannot change), 400 for a rejected delivery, 500 when the store failed.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self.outcome {
            WebhookOutcome::Rejected(_) => StatusCode::BAD_REQUEST,
            WebhookOutcome::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::OK,
        }
    }

    /// The body: `{"received":true,"outcome":"applied"}`, or a problem+json for a refusal.
    #[must_use]
    pub fn body(&self) -> String {
        let outcome = match &self.outcome {
            WebhookOutcome::Applied { .. } => "applied",
            WebhookOutcome::Credited { .. } => "credited",
            WebhookOutcome::Refunded { .. } => "refunded",
            WebhookOutcome::RefundKept { .. } => "refund_kept",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::Stale => "stale",
            WebhookOutcome::UnknownCustomer => "unknown_customer",
            WebhookOutcome::FileTenant { .. } => "file_tenant",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::UnknownPrice => "unknown_price",
            WebhookOutcome::MeterError { .. } => "meter_error",
            WebhookOutcome::NotCredited { .. } => "not_credited",
            WebhookOutcome::PaymentUnknown { .. } => "payment_unknown",
            WebhookOutcome::Rejected(reason) => {
                return serde_json::json!({
                    "type": "https://tollgate.rs/problems/bad-webhook",
                    "title": "Bad webhook",
                    "status": 400,
                    "detail": reason,
                })
                .to_string()
            }
            WebhookOutcome::TooLarge => {
                return serde_json::json!({
                    "type": "https://tollgate.rs/problems/bad-webhook",
                    "title": "Webhook too large",
                    "status": 413,
                    "detail": format!("the body is longer than {} bytes", WebhookHandler::MAX_BODY),
                })
                .to_string()
            }
            WebhookOutcome::ApiFailed(_) => {
                return serde_json::json!({
                    "type": "https://tollgate.rs/problems/stripe-unavailable",
                    "title": "Stripe API unavailable",
                    "status": 500,
                    "detail": "the payment's details could not be read; deliver it again",
                })
                .to_string()
            }
            WebhookOutcome::StoreFailed(_) => {
                return serde_json::json!({
                    "type": "https://tollgate.rs/problems/store-unavailable",
                    "title": "Store unavailable",
                    "status": 500,
                    "detail": "the event was not applied; deliver it again",
                })
                .to_string()
            }
        };
        serde_json::json!({ "received": true, "outcome": outcome }).to_string()
    }

    /// As an HTTP response.
    pub fn into_response(self) -> http::Response<Bytes> {
        let content_type = if self.status().is_success() { "application/json" } else { "application/problem+json" };
        let mut response = http::Response::new(Bytes::from(self.body()));
        *response.status_mut() = self.status();
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        response
    }
}

/// Verifies Stripe webhook deliveries and moves tenants between plans as `[stripe]`
/// configures; framework-free (the signature header's value and the raw body in, a
/// [`WebhookReply`] out).
///
/// - The signature is checked with async-stripe-webhook (any of several `v1` signatures,
///   300 s tolerance, measured by the engine's clock) against each configured secret in turn
///   (several during a rotation). A bad or expired signature gets 400 and changes nothing.
/// - A verified event the typed parser refuses (another API version, a type it does not
///   know) is read with serde_json for the few fields a transition needs.
/// - The event id is marked seen and the plan changed in one store write, only if the id is
///   new and the event is not older than the last one applied: of its subscription for a
///   subscription's event (whose plan then follows every live subscription of the customer:
///   see the [Stripe guide](crate::guide::stripe)), of the customer for another. A duplicate or
///   an older event is a 200 no-op; a store failure is a 500 and changes nothing, so Stripe's
///   retry applies it.
/// - The new plan applies at once on this node, within `limits.directory_ttl` elsewhere.
pub struct WebhookHandler {
    /// The policy of its store calls: background calls, within `limits.background_timeout`.
    calls: Arc<Policy>,
    pub(in crate::billing) directory: Arc<dyn DirectoryStore>,
    pub(in crate::billing) node: Arc<dyn DirectoryEvents>,
    config: Arc<dyn Fn() -> Config + Send + Sync>,
    pub(in crate::billing) clock: Clock,
    secrets: Vec<Secret>,
    /// Where prepaid balances are topped up (`[stripe.credits]`).
    pub(in crate::billing) quota: Option<Arc<dyn QuotaStore>>,
    /// Reads what an event lacks (a payment's line items) with the secret key.
    pub(in crate::billing) reader: Option<Arc<StripeReader>>,
    /// The price ids of `[stripe.credits.prices]`'s lookup keys, as Stripe last said.
    pub(in crate::billing) lookup_keys: Arc<crate::billing::prices::LookupKeys>,
    /// The event destination of Stripe's thin meter error events, if configured.
    destination: Option<Arc<Destination>>,
    /// Refusals logged at most once a second: the second of the last log, and the refusals
    /// since, not logged.
    refusals: Arc<RefusalLog>,
}

/// Refusals of deliveries, logged at most once a second with the count of those not logged:
/// a flood of forged deliveries does not flood the log.
#[derive(Debug, Default)]
struct RefusalLog {
    last: std::sync::atomic::AtomicI64,
    unlogged: std::sync::atomic::AtomicU64,
}

impl RefusalLog {
    fn refused(&self, now: i64, reason: &str) {
        use std::sync::atomic::Ordering;
        let last = self.last.load(Ordering::Relaxed);
        if now > last && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(%reason, not_logged_before = unlogged, "Stripe webhook refused");
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for WebhookHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookHandler").field("secrets", &self.secrets.len()).finish_non_exhaustive()
    }
}

impl WebhookHandler {
    /// The longest body a delivery may have: 1 MiB, far above Stripe's events (an event's
    /// object embeds its lists truncated, an invoice's `lines` at 10, and metadata is capped at
    /// 50 keys of 500 characters). Every door's webhook route reads at most this much; a longer
    /// body gets 413 and changes nothing.
    pub const MAX_BODY: usize = 1 << 20;

    /// A handler over the parts it uses, for a process that handles webhooks without serving
    /// requests (a webhook-only function): the directory plans are changed in, who is told of
    /// a change (`node`; the engine, when there is one: see
    /// [`Tollgate::webhook_handler`](crate::Tollgate::webhook_handler)), the
    /// configuration in force (read at each delivery, so a reload applies), the clock
    /// signatures are checked against, and the signing secrets. Each store call is bounded by
    /// the configuration's `limits.background_timeout` as it was at this call.
    pub fn from_parts(
        directory: Arc<dyn DirectoryStore>,
        node: Arc<dyn DirectoryEvents>,
        config: impl Fn() -> Config + Send + Sync + 'static,
        clock: Clock,
        secrets: Vec<Secret>,
    ) -> Self {
        let calls = Policy::standalone();
        calls.configure(&config());
        Self::calling(calls, directory, node, config, clock, secrets)
    }

    /// A handler whose store calls `calls` makes (an engine's policy, for an engine's handler).
    pub(crate) fn calling(
        calls: Arc<Policy>,
        directory: Arc<dyn DirectoryStore>,
        node: Arc<dyn DirectoryEvents>,
        config: impl Fn() -> Config + Send + Sync + 'static,
        clock: Clock,
        secrets: Vec<Secret>,
    ) -> Self {
        Self {
            directory: Arc::new(Limited::new(directory, calls.clone(), Path::Background)),
            calls,
            node,
            config: Arc::new(config),
            clock,
            secrets,
            quota: None,
            reader: None,
            lookup_keys: Arc::default(),
            destination: None,
            refusals: Arc::default(),
        }
    }

    /// Tops up prepaid balances in `quota` from payments, as `[stripe.credits]` configures (a
    /// handler made by [`Tollgate::webhook_handler`](crate::Tollgate::webhook_handler) uses the engine's quota store).
    #[must_use]
    pub fn with_quota(mut self, quota: Arc<dyn QuotaStore>) -> Self {
        self.quota = Some(Arc::new(Limited::new(quota, self.calls.clone(), Path::Background)));
        self
    }

    /// Reads what a payment's event lacks (the line items of a checkout session, an invoice's
    /// lines past the ten it embeds) from Stripe's API with `api_key`, from `api_base` or
    /// `https://api.stripe.com/`, within `timeout` (at most 10 s).
    /// [`Tollgate::webhook_handler`](crate::Tollgate::webhook_handler) sets it from the secret key
    /// when there is one.
    #[must_use]
    pub fn with_api_key(mut self, api_key: Secret, api_base: Option<&str>, timeout: std::time::Duration) -> Self {
        self.reader = Some(Arc::new(StripeReader::new(api_key, api_base, timeout)));
        self
    }

    /// Also takes the thin events of an event destination (Stripe's meter errors,
    /// `v1.billing.meter.error_report_triggered` and `v1.billing.meter.no_meter_found`),
    /// verified with its signing `secrets`: each is fetched in full (`GET /v2/core/events/{id}`,
    /// with `api_key`, from `api_base` or `https://api.stripe.com/`, within `timeout`) for the
    /// window and the errors it names, logged, counted (`Stats::meter_errors`,
    /// `tollgate_billing_meter_errors_total`), and the hours around the window reconciled (a
    /// report). Without a destination, thin events are refused (400).
    #[must_use]
    pub fn with_event_destination(
        mut self,
        secrets: Vec<Secret>,
        api_key: Option<Secret>,
        api_base: Option<&str>,
        timeout: std::time::Duration,
    ) -> Self {
        if api_key.is_none() {
            tracing::warn!("Stripe meter error events will be counted but not read in full: no secret key");
        }
        let reader = api_key.map(|key| Arc::new(StripeReader::new(key, api_base, timeout)));
        if self.reader.is_none() {
            self.reader = reader.clone();
        }
        self.destination = Some(Arc::new(Destination { secrets, reader, seen: std::sync::Mutex::default() }));
        self
    }

    /// Handles one delivery: the `Stripe-Signature` header's value (if any) and the raw body.
    pub async fn handle(&self, signature: Option<&str>, body: &[u8]) -> WebhookReply {
        let outcome = if body.len() > Self::MAX_BODY {
            self.refusals.refused(self.clock.unix_secs(), "the body is longer than WebhookHandler::MAX_BODY");
            WebhookOutcome::TooLarge
        } else {
            self.outcome(signature, body).await
        };
        if let WebhookOutcome::Rejected(reason) = &outcome {
            self.refusals.refused(self.clock.unix_secs(), reason);
        }
        let count = match &outcome {
            WebhookOutcome::Applied { .. }
            | WebhookOutcome::Credited { .. }
            | WebhookOutcome::Refunded { .. }
            | WebhookOutcome::RefundKept { .. } => WebhookCount::Applied,
            WebhookOutcome::Rejected(_) | WebhookOutcome::TooLarge => WebhookCount::Rejected,
            WebhookOutcome::MeterError { .. } => WebhookCount::MeterError,
            WebhookOutcome::NotCredited { .. } | WebhookOutcome::PaymentUnknown { .. } => WebhookCount::NotCredited,
            WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_) => return WebhookReply { outcome },
            _ => WebhookCount::Ignored,
        };
        self.node.webhook_handled(count);
        WebhookReply { outcome }
    }

    async fn outcome(&self, signature: Option<&str>, body: &[u8]) -> WebhookOutcome {
        let Some(signature) = signature else {
            return reject("no Stripe-Signature header");
        };
        let now = self.clock.unix_secs();
        let Ok(payload) = std::str::from_utf8(body) else {
            // async-stripe verifies text only: checked over the bytes, as Stripe signs them.
            if self.secrets.iter().any(|secret| signed_bytes(signature, body, secret.expose(), now)) {
                // Signed by Stripe, so not retried with a 400 for days: taken and logged.
                tracing::warn!("verified Stripe webhook whose body is not UTF-8: ignored");
                return WebhookOutcome::Ignored;
            }
            return reject("the body is not UTF-8, and no signature matches a configured secret");
        };
        // A thin event (an event destination's), by its envelope's own `object`: verified
        // with the destination's secrets before anything else of it is read. (Not by a
        // search of the text: a snapshot event may carry that string in any field a customer
        // fills in.)
        if is_thin(payload) {
            let Some(destination) = &self.destination else {
                return reject("a thin event (an event destination's), and no event destination secret is configured");
            };
            if !destination.secrets.iter().any(|s| signed_bytes(signature, body, s.expose(), now)) {
                return reject("no signature matches an event destination secret");
            }
            if let Some(thin) = thin_event(payload) {
                return self.thin(destination, thin).await;
            }
            return reject("signed by the event destination, but not a thin event");
        }
        let mut verified = None;
        for secret in &self.secrets {
            match Webhook::construct_event_with_timestamp(payload, signature, secret.expose(), now) {
                Ok(event) => {
                    verified = Some(typed_fields(&event).or_else(|| json_fields(payload)));
                    break;
                }
                Err(WebhookError::BadSignature | WebhookError::BadKey) => {}
                Err(WebhookError::BadHeader(_)) => return reject("malformed Stripe-Signature header"),
                Err(WebhookError::BadTimestamp(t)) => {
                    return reject(&format!("signature timestamp {t} is outside the 300 s tolerance"))
                }
                // Verified: the signature matched before parsing began.
                Err(WebhookError::BadParse(_)) => {
                    verified = Some(json_fields(payload));
                    break;
                }
            }
        }
        let Some(fields) = verified else {
            return reject("no signature matches a configured secret");
        };
        let Some(fields) = fields else {
            // Signed by Stripe, so not retried with a 400 for days: taken and logged.
            tracing::warn!("verified Stripe webhook without an id, a type or a time: ignored");
            return WebhookOutcome::Ignored;
        };
        let config = (self.config)();
        let Some(settings) = config.stripe() else {
            tracing::warn!(event = %fields.id, kind = %fields.kind, "Stripe webhook ignored: no [stripe] section");
            return WebhookOutcome::Ignored;
        };
        // A payment that tops up a prepaid balance; other payments go on to the plan
        // transitions.
        if let Some(credits) = &settings.credits {
            if let Some(outcome) = self.payment_event(&config, credits, &fields.id, &fields.kind, payload).await {
                // A payment whose event is also a configured plan transition moves the plan too
                // (once its credits are settled: a failure is delivered again, whole).
                let failed = matches!(outcome, WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_));
                if failed || !settings.events.contains_key(&fields.kind) {
                    return outcome;
                }
                tracing::info!(event = %fields.id, kind = %fields.kind, ?outcome, "credits settled; now the plan transition");
            }
        }
        if let Some(subscription) = fields.subscription.clone() {
            return self.subscription_event(&config, settings, &fields, &subscription).await;
        }
        let plan = match transition(settings, &fields) {
            Ok(Some(plan)) => plan,
            Ok(None) => {
                tracing::info!(event = %fields.id, kind = %fields.kind, status = ?fields.status,
                    "Stripe webhook ignored: no transition configured");
                return WebhookOutcome::Ignored;
            }
            Err(()) => {
                tracing::warn!(event = %fields.id, prices = ?fields.prices,
                    "Stripe webhook ignored: the subscription's prices are not in [stripe.prices]");
                return WebhookOutcome::UnknownPrice;
            }
        };
        let Some(customer) = fields.customer.clone() else {
            tracing::warn!(event = %fields.id, kind = %fields.kind, "Stripe webhook ignored: it names no customer");
            return WebhookOutcome::Ignored;
        };
        self.customer_event(&config, settings, &fields, &customer, plan).await
    }
}

/// A refusal (logged by [`WebhookHandler::handle`], at most once a second).
fn reject(reason: &str) -> WebhookOutcome {
    WebhookOutcome::Rejected(reason.to_owned())
}

#[cfg(test)]
mod refusal_log_tests {
    use std::sync::atomic::Ordering;

    use super::RefusalLog;

    /// A flood of refusals is logged once a second, with the count of those not logged.
    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let log = RefusalLog::default();
        log.refused(100, "bad");
        assert_eq!((log.last.load(Ordering::Relaxed), log.unlogged.load(Ordering::Relaxed)), (100, 0));
        for _ in 0..1000 {
            log.refused(100, "bad");
        }
        assert_eq!(log.unlogged.load(Ordering::Relaxed), 1000, "not logged within the second");
        log.refused(101, "bad");
        assert_eq!((log.last.load(Ordering::Relaxed), log.unlogged.load(Ordering::Relaxed)), (101, 0));
    }
}
