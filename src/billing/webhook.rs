//! Stripe webhooks that move tenants between plans: verified, de-duplicated and ordered in one
//! store write, applied at once on this node and within `limits.directory_ttl` on the others.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use http::StatusCode;
use stripe_webhook::{EventObject, Webhook, WebhookError};

pub(crate) use super::stripe::read_secrets;
use super::{reader::StripeReader, Secret};
use crate::{
    clock::Clock,
    config::{Config, MeterId, PlanId, StripeSettings, TenantId},
    store::{
        limited::{Limited, Path, Policy},
        DirectoryEvents, DirectoryStore, PlanChange, PlanChangeOutcome, QuotaStore, WebhookCount,
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

/// The fields of an event a transition needs.
#[derive(Debug, Default)]
struct Fields {
    id: String,
    kind: String,
    created: i64,
    customer: Option<String>,
    /// The subscription's status, when the object is a subscription.
    status: Option<String>,
    /// The subscription's prices: ids and lookup keys.
    prices: Vec<String>,
    /// The subscription's id, when the object is a subscription.
    subscription: Option<String>,
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
    pub(super) directory: Arc<dyn DirectoryStore>,
    pub(super) node: Arc<dyn DirectoryEvents>,
    config: Arc<dyn Fn() -> Config + Send + Sync>,
    pub(super) clock: Clock,
    secrets: Vec<Secret>,
    /// Where prepaid balances are topped up (`[stripe.credits]`).
    pub(super) quota: Option<Arc<dyn QuotaStore>>,
    /// Reads what an event lacks (a payment's line items) with the secret key.
    pub(super) reader: Option<Arc<StripeReader>>,
    /// The price ids of `[stripe.credits.prices]`'s lookup keys, as Stripe last said.
    pub(super) lookup_keys: Arc<super::prices::LookupKeys>,
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

    /// An event of the customer, not of one of its subscriptions (`[stripe.events]`, such as
    /// `payment_method.attached`): it moves the tenant only while no live subscription gives
    /// it a plan. The write is conditional on the subscriptions and plan as read, and records
    /// the event's time among the subscriptions, so a subscription's event, or a newer
    /// customer event, that lands meanwhile makes it read again.
    async fn customer_event(
        &self,
        config: &Config,
        settings: &StripeSettings,
        fields: &Fields,
        customer: &str,
        plan: PlanId,
    ) -> WebhookOutcome {
        for _ in 0..8 {
            let record = match self.directory.tenant_by_customer(customer).await {
                Ok(Some(record)) => record,
                Ok(None) => {
                    let change = PlanChange::new(fields.id.clone(), customer.to_owned(), fields.created, plan.clone());
                    let result = self.directory.apply_plan_change(&change).await;
                    return self.settle(config, fields, customer, &plan, result);
                }
                Err(e) => return self.settle(config, fields, customer, &plan, Err(e)),
            };
            let (mut subs, legacy) = match Subscriptions::of(fields, &record) {
                Ok(read) => read,
                Err(outcome) => return outcome,
            };
            // No subscription event stored yet: what its subscriptions give is unknown, and they
            // stay so (`legacy`, kept for its first subscription event's rules).
            subs.legacy = legacy;
            if record.last_event_at.is_some_and(|last| last > fields.created)
                || subs.customer_at.is_some_and(|last| last > fields.created)
            {
                tracing::info!(event = %fields.id, %customer, "Stripe webhook older than the last applied: ignored");
                return WebhookOutcome::Stale;
            }
            // Without stored subscriptions, a plan a price gives stands for a live subscription
            // that gives it (a tenant from before, or one set on its plan by hand).
            let priced = legacy && settings.prices.values().any(|p| p == &record.plan);
            if let Some(best) = subs.best(&Order::new(settings)).or_else(|| priced.then(|| record.plan.clone())) {
                tracing::info!(event = %fields.id, kind = %fields.kind, tenant = %record.id, %best, mapped = %plan,
                    "Stripe webhook of the customer ignored: a live subscription gives the plan \
                     (dunning goes through [stripe.subscription_status])");
                return WebhookOutcome::Ignored;
            }
            subs.customer_at = Some(fields.created);
            let change = PlanChange::new(fields.id.clone(), customer.to_owned(), fields.created, plan.clone())
                .with_subscriptions(&record, subs.to_json());
            match self.directory.apply_plan_change(&change).await {
                Ok(PlanChangeOutcome::Changed) => {}
                result => return self.settle(config, fields, customer, &plan, result),
            }
        }
        WebhookOutcome::StoreFailed("the tenant's subscriptions kept changing under concurrent events".into())
    }

    /// A subscription's event: ordered by its subscription (by `created`, ties broken by the
    /// event's meaning: created, then updated, then deleted), recorded with the tenant's other
    /// subscriptions, and the tenant's plan computed from every live one: the highest of the
    /// plans they give (`[stripe] plan_order`); with none left after a subscription that gave
    /// one ended, the canceled outcome. A subscription that gives no plan (an add-on on a price
    /// `[stripe.prices]` does not map) never moves the tenant.
    async fn subscription_event(
        &self,
        config: &Config,
        settings: &StripeSettings,
        fields: &Fields,
        subscription: &str,
    ) -> WebhookOutcome {
        let Some(customer) = fields.customer.clone() else {
            tracing::warn!(event = %fields.id, kind = %fields.kind, "Stripe webhook ignored: it names no customer");
            return WebhookOutcome::Ignored;
        };
        let rank = event_rank(&fields.kind);
        let status = fields.status.as_deref().unwrap_or_default();
        let ended =
            fields.kind == "customer.subscription.deleted" || matches!(status, "canceled" | "incomplete_expired");
        let by_price = fields.prices.iter().find_map(|p| settings.prices.get(p)).cloned();
        let transition = transition(settings, fields);
        // What the subscription gives after the event: a plan, nothing, or what it gave before
        // (a status mapped to `ignore`, or no transition configured).
        let gives: Option<Option<PlanId>> = match (&transition, ended) {
            (_, true) | (Err(()), _) => Some(None),
            (Ok(Some(plan)), false) => Some(Some(plan.clone())),
            (Ok(None), false) => None,
        };
        for _ in 0..8 {
            let record = match self.directory.tenant_by_customer(&customer).await {
                Ok(Some(record)) => record,
                Ok(None) => {
                    return self.settle(
                        config,
                        fields,
                        &customer,
                        &PlanId::from(""),
                        Ok(PlanChangeOutcome::UnknownCustomer),
                    )
                }
                Err(e) => return self.settle(config, fields, &customer, &PlanId::from(""), Err(e)),
            };
            let (mut subs, legacy) = match Subscriptions::of(fields, &record) {
                Ok(read) => read,
                Err(outcome) => return outcome,
            };
            // From this event on they are stored.
            subs.legacy = false;
            let before = subs.subs.get(subscription).cloned();
            let stale = match &before {
                Some(b) => (b.at, b.rank) > (fields.created, rank),
                // Older than what was forgotten (or, before this version, than the last event).
                None => fields.created < subs.floor,
            };
            if stale {
                tracing::info!(event = %fields.id, %customer, subscription,
                    "Stripe webhook older than the last applied for its subscription: ignored");
                return WebhookOutcome::Stale;
            }
            let gave = before.as_ref().and_then(|b| b.plan.as_deref().map(PlanId::from));
            let bore = before.as_ref().is_some_and(|b| b.bore) || gave.is_some();
            let now_gives = gives.clone().unwrap_or_else(|| gave.clone());
            // A subscription that gives (or gave) a plan: its end, or its move to a price no
            // plan maps, moves the tenant.
            let bearing = bore || by_price.is_some();
            let lost_plan = bearing && now_gives.is_none();
            let order = Order::new(settings);
            let best_before = subs.best(&order);
            let plan_text = now_gives.as_ref().map(|p| p.as_str().to_owned());
            let bore_now = bore || now_gives.is_some();
            subs.subs
                .insert(subscription.to_owned(), Sub { at: fields.created, rank, plan: plan_text, bore: bore_now });
            subs.prune();
            let best = subs.best(&order);
            let plan = if legacy {
                match (&gives, ended) {
                    (Some(Some(plan)), _) => plan.clone(),
                    (_, true) if by_price.is_some() => canceled_plan(settings).unwrap_or_else(|| record.plan.clone()),
                    _ => record.plan.clone(),
                }
            } else {
                match best {
                    // Written only when the best changes or this subscription gives it anew: a
                    // plan set by hand survives an add-on's event or an ignored status.
                    Some(best) if best_before.as_ref() != Some(&best) || matches!(gives, Some(Some(_))) => best,
                    Some(_) => record.plan.clone(),
                    None if lost_plan => canceled_plan(settings).unwrap_or_else(|| record.plan.clone()),
                    None => record.plan.clone(),
                }
            };
            let moved = matches!(gives, Some(Some(_)))
                || (lost_plan && !legacy)
                || (ended && by_price.is_some())
                || plan != record.plan;
            let change = PlanChange::new(fields.id.clone(), customer.clone(), fields.created, plan.clone())
                .with_subscriptions(&record, subs.to_json());
            match self.directory.apply_plan_change(&change).await {
                Ok(PlanChangeOutcome::Changed) => {}
                Ok(PlanChangeOutcome::Applied(_)) if !moved => {
                    // Recorded (its order holds for later events), nothing moved.
                    return match transition {
                        Err(()) => {
                            tracing::warn!(event = %fields.id, prices = ?fields.prices,
                                "Stripe webhook: the subscription's prices are not in [stripe.prices]; the plan follows the customer's other subscriptions");
                            WebhookOutcome::UnknownPrice
                        }
                        _ => {
                            tracing::info!(event = %fields.id, kind = %fields.kind, status = ?fields.status,
                                "Stripe webhook recorded: no transition configured, the plan is unchanged");
                            WebhookOutcome::Ignored
                        }
                    };
                }
                result => return self.settle(config, fields, &customer, &plan, result),
            }
        }
        WebhookOutcome::StoreFailed("the tenant's subscriptions kept changing under concurrent events".into())
    }

    /// The outcome of a plan change the store answered.
    fn settle(
        &self,
        config: &Config,
        fields: &Fields,
        customer: &str,
        plan: &PlanId,
        result: Result<PlanChangeOutcome, crate::store::StoreError>,
    ) -> WebhookOutcome {
        match result {
            Ok(PlanChangeOutcome::Applied(record)) => {
                // The tenant's overrides are checked over the new plan as `Admin::set_plan`
                // checks them. The customer paid for the plan: it is applied whatever they say,
                // and nodes serve it without overrides that do not fit (counted there).
                if let Some(json) = record.overrides.as_deref().filter(|o| !o.trim().is_empty()) {
                    let fits = crate::config::PlanOverride::from_json(json, config)
                        .map_err(|e| e.to_string())
                        .and_then(|o| config.check_override(&record.plan, &o));
                    if let Err(why) = fits {
                        tracing::error!(event = %fields.id, tenant = %record.id, plan = %record.plan,
                            "the tenant's overrides do not fit the plan a Stripe webhook moved it to ({why}): \
                             it is served the plan without them until they are mended (tollgate tenants set-override)");
                    }
                }
                self.node.tenant_changed(&record.id);
                tracing::info!(event = %fields.id, kind = %fields.kind, tenant = %record.id, plan = %record.plan,
                    "plan changed by a Stripe webhook");
                WebhookOutcome::Applied { tenant: record.id, plan: record.plan }
            }
            Ok(PlanChangeOutcome::Duplicate) => WebhookOutcome::Duplicate,
            Ok(PlanChangeOutcome::Stale) => {
                tracing::info!(event = %fields.id, %customer, "Stripe webhook older than the last applied: ignored");
                WebhookOutcome::Stale
            }
            Ok(PlanChangeOutcome::UnknownCustomer) => {
                if let Some(t) = config.tenants().iter().find(|t| t.stripe_customer() == Some(customer)) {
                    tracing::warn!(event = %fields.id, %customer, tenant = %t.id(), %plan,
                        "Stripe webhook for a tenant declared in the configuration file: its plan is the file's, \
                         nothing changed (change it in the file, or move the tenant to the store's directory)");
                    return WebhookOutcome::FileTenant { tenant: t.id().clone() };
                }
                tracing::warn!(event = %fields.id, %customer, "Stripe webhook for a customer no tenant has: ignored");
                WebhookOutcome::UnknownCustomer
            }
            Ok(PlanChangeOutcome::Changed) => {
                // Only a subscription's change is answered Changed; its caller reads again.
                WebhookOutcome::StoreFailed("the tenant changed meanwhile".into())
            }
            Err(e) => {
                tracing::error!(event = %fields.id, error = %e, "Stripe webhook not applied: the store failed");
                WebhookOutcome::StoreFailed(e.to_string())
            }
        }
    }
}

/// Events of one subscription in one second are ordered by their meaning: created, then
/// updated (and the others), then deleted.
fn event_rank(kind: &str) -> u8 {
    match kind {
        "customer.subscription.created" => 0,
        "customer.subscription.deleted" => 2,
        _ => 1,
    }
}

/// The plan a customer is moved to when its last subscription giving a plan ends: the one
/// `customer.subscription.deleted` maps to, else the `canceled` status's.
fn canceled_plan(settings: &StripeSettings) -> Option<PlanId> {
    settings.events.get("customer.subscription.deleted").cloned().or_else(|| {
        match settings.subscription_status.get("canceled") {
            Some(crate::config::StatusOutcome::Plan(plan)) => Some(plan.clone()),
            _ => None,
        }
    })
}

/// One subscription as the webhooks last saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Sub {
    /// Its last event's `created`, and that event's rank ([`event_rank`]).
    at: i64,
    rank: u8,
    /// The plan it gives; `None` once ended, or when its prices map to no plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan: Option<String>,
    /// Whether it ever gave a plan: its end, or its move to a price no plan maps, then moves
    /// the tenant.
    #[serde(default)]
    bore: bool,
}

/// A tenant's subscriptions by id ([`TenantRecord::subscriptions`](crate::store::TenantRecord::subscriptions)),
/// and the time below which a subscription not kept is stale (what was forgotten).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Subscriptions {
    #[serde(default)]
    floor: i64,
    subs: std::collections::BTreeMap<String, Sub>,
    /// The `created` of the last event of the customer (not of a subscription) applied: an
    /// older one is stale, and writing it makes concurrent customer events conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    customer_at: Option<i64>,
    /// Written by a customer's event alone: no subscription event was stored yet, so the
    /// tenant's first one follows the rules of a tenant from before subscriptions were stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    legacy: bool,
}

/// How plans rank: `[stripe] plan_order` first, then the plans prices give, then the rest.
struct Order<'a> {
    listed: &'a [PlanId],
    priced: std::collections::BTreeSet<&'a str>,
}

impl<'a> Order<'a> {
    fn new(settings: &'a StripeSettings) -> Self {
        Self { listed: &settings.plan_order, priced: settings.prices.values().map(PlanId::as_str).collect() }
    }

    /// Lower is higher.
    fn rank(&self, plan: &str) -> usize {
        match self.listed.iter().position(|o| o.as_str() == plan) {
            Some(i) => i,
            None if self.priced.contains(plan) => self.listed.len(),
            None => self.listed.len() + 1,
        }
    }
}

impl Subscriptions {
    /// At most this many are kept per tenant: those giving no plan go first, oldest first.
    const MAX: usize = 32;

    /// The tenant's subscriptions as stored, and whether no subscription event of it was
    /// stored yet (from before this version, or only its customer's events since): then its
    /// last event orders them all, and its plan follows one event alone, as before. Unreadable
    /// ones are never written over (their order and ended subscriptions would be lost).
    fn of(fields: &Fields, record: &crate::store::TenantRecord) -> Result<(Self, bool), WebhookOutcome> {
        let mut subs = Self::parse(record.subscriptions.as_deref()).map_err(|e| {
            tracing::error!(event = %fields.id, tenant = %record.id, error = %e,
                "the tenant's stored subscriptions are unreadable: the event is not applied");
            WebhookOutcome::StoreFailed(format!("the tenant's stored subscriptions are unreadable: {e}"))
        })?;
        let legacy = record.subscriptions.is_none() || subs.legacy;
        if legacy {
            subs.floor = record.last_event_at.unwrap_or(i64::MIN);
        }
        Ok((subs, legacy))
    }

    /// As stored.
    fn parse(text: Option<&str>) -> Result<Self, serde_json::Error> {
        text.map_or_else(|| Ok(Self { floor: i64::MIN, ..Self::default() }), serde_json::from_str)
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Bounded: subscriptions that give nothing go first, then the oldest; the floor rises to
    /// the newest event forgotten, so a late event of a forgotten subscription is stale.
    fn prune(&mut self) {
        while self.subs.len() > Self::MAX {
            let victim =
                self.subs.iter().min_by_key(|(_, s)| (s.plan.is_some(), s.at, s.rank)).map(|(id, _)| id.clone());
            let Some(id) = victim else { break };
            if let Some(gone) = self.subs.remove(&id) {
                self.floor = self.floor.max(gone.at + 1);
            }
        }
    }

    /// The plan of the live subscriptions: the highest by `order`, among equals the one whose
    /// event came last.
    fn best(&self, order: &Order<'_>) -> Option<PlanId> {
        self.subs
            .values()
            .filter_map(|s| s.plan.as_ref().map(|p| (p, s.at, s.rank)))
            .min_by(|a, b| order.rank(a.0).cmp(&order.rank(b.0)).then((b.1, b.2).cmp(&(a.1, a.2))))
            .map(|(p, _, _)| PlanId::from(p.as_str()))
    }
}

impl WebhookHandler {
    /// A verified thin event: a meter error is fetched in full, logged, counted, and its window
    /// reconciled; a redelivery of one handled here is a duplicate.
    async fn thin(&self, destination: &Destination, thin: Thin) -> WebhookOutcome {
        if !METER_ERRORS.contains(&thin.kind.as_str()) {
            tracing::info!(event = %thin.id, kind = %thin.kind, "Stripe thin event ignored: not a meter error");
            return WebhookOutcome::Ignored;
        }
        if !destination.first_time(&thin.id) {
            return WebhookOutcome::Duplicate;
        }
        let created = chrono::DateTime::parse_from_rfc3339(&thin.created).ok().map(|t| t.timestamp());
        match destination.fetch(&thin.id).await {
            Ok(full) => {
                let report = MeterErrorReport::of(&full);
                tracing::error!(event = %thin.id, kind = %thin.kind, created = %thin.created,
                    meter = ?thin.related, errors = report.errors, codes = ?report.codes, identifiers = ?report.identifiers,
                    summary = %report.summary, from = ?report.window.map(|w| w.0), to = ?report.window.map(|w| w.1),
                    "Stripe refused meter events after taking them: fix the cause (the customer, the meter); \
                     reconciliation finds them lacking and sends them again once proven");
                if let Some((from, to)) = report.window.or(created.map(|c| (c, c))) {
                    self.node.meter_error(from, to);
                }
                WebhookOutcome::MeterError { kind: thin.kind, errors: report.errors }
            }
            Err(why) => {
                tracing::error!(event = %thin.id, kind = %thin.kind, created = %thin.created, error = %why,
                    "Stripe reported a meter error; its full event could not be read (GET /v2/core/events): \
                     see it in the Dashboard (Workbench, Events)");
                // The thin event's own time stands for the window.
                if let Some(c) = created {
                    self.node.meter_error(c, c);
                }
                WebhookOutcome::MeterError { kind: thin.kind, errors: 0 }
            }
        }
    }
}

/// Stripe's meter error events (thin events).
const METER_ERRORS: [&str; 2] = ["v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"];

/// An event destination: its signing secrets, how to read a full event, and the thin events
/// handled lately (a redelivery is a duplicate).
struct Destination {
    secrets: Vec<Secret>,
    reader: Option<Arc<StripeReader>>,
    seen: std::sync::Mutex<std::collections::VecDeque<String>>,
}

/// How many thin event ids a handler remembers.
const THIN_SEEN: usize = 1024;

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination").field("secrets", &self.secrets.len()).finish_non_exhaustive()
    }
}

impl Destination {
    /// Whether this thin event id is new to this handler (remembered among the last
    /// [`THIN_SEEN`]).
    fn first_time(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.iter().any(|s| s == id) {
            return false;
        }
        if seen.len() >= THIN_SEEN {
            seen.pop_front();
        }
        seen.push_back(id.to_owned());
        true
    }

    /// `GET /v2/core/events/{id}`.
    async fn fetch(&self, id: &str) -> Result<serde_json::Value, String> {
        let reader = self.reader.as_ref().ok_or("no Stripe secret key to read it with")?;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`{id}` is not an event id"));
        }
        reader.get(&format!("v2/core/events/{id}")).await.map_err(|e| e.why)
    }
}

/// What a thin event says: its id, type, time (an RFC 3339 string) and related object.
#[derive(Debug)]
struct Thin {
    id: String,
    kind: String,
    created: String,
    related: Option<String>,
}

/// Whether the envelope says it is a thin event: its top-level `object` is `v2.core.event`
/// (a snapshot event's is `event`). Only that field is read; any other, at any depth, is
/// skipped.
fn is_thin(payload: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow, default)]
        object: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Envelope<'_>>(payload).is_ok_and(|e| e.object.as_deref() == Some("v2.core.event"))
}

/// A thin event (`"object": "v2.core.event"`), if the payload is one.
fn thin_event(payload: &str) -> Option<Thin> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    if v["object"].as_str() != Some("v2.core.event") {
        return None;
    }
    Some(Thin {
        id: v["id"].as_str().unwrap_or_default().to_owned(),
        kind: v["type"].as_str().unwrap_or_default().to_owned(),
        created: v["created"].as_str().unwrap_or_default().to_owned(),
        related: v["related_object"]["id"].as_str().map(str::to_owned),
    })
}

/// What a full meter error event reports: the validation window, the count, the error codes
/// and sample identifiers.
#[derive(Debug, Default)]
struct MeterErrorReport {
    window: Option<(i64, i64)>,
    errors: u64,
    codes: Vec<String>,
    identifiers: Vec<String>,
    summary: String,
}

impl MeterErrorReport {
    fn of(full: &serde_json::Value) -> Self {
        let data = &full["data"];
        let time = |k: &str| {
            data[k].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.timestamp())
        };
        let mut report = Self {
            window: time("validation_start").zip(time("validation_end")),
            errors: data["reason"]["error_count"].as_u64().unwrap_or(0),
            summary: data["developer_message_summary"].as_str().unwrap_or_default().to_owned(),
            ..Self::default()
        };
        for t in data["reason"]["error_types"].as_array().into_iter().flatten().take(20) {
            report.codes.extend(t["code"].as_str().map(str::to_owned));
            for e in t["sample_errors"].as_array().into_iter().flatten().take(5) {
                report.identifiers.extend(e["request"]["identifier"].as_str().map(str::to_owned));
            }
        }
        report
    }
}

/// A refusal (logged by [`WebhookHandler::handle`], at most once a second).
fn reject(reason: &str) -> WebhookOutcome {
    WebhookOutcome::Rejected(reason.to_owned())
}

/// The plan an event moves its customer to: `Ok(None)` when none is configured, `Err(())`
/// for an active subscription whose prices are not mapped.
fn transition(settings: &StripeSettings, f: &Fields) -> Result<Option<PlanId>, ()> {
    if let Some(plan) = settings.events.get(&f.kind) {
        return Ok(Some(plan.clone()));
    }
    let Some(status) = &f.status else { return Ok(None) };
    match settings.subscription_status.get(status) {
        Some(crate::config::StatusOutcome::Plan(plan)) => return Ok(Some(plan.clone())),
        Some(_) => return Ok(None),
        None => {}
    }
    if status == "active" || status == "trialing" {
        return f.prices.iter().find_map(|p| settings.prices.get(p)).cloned().map(Some).ok_or(());
    }
    Ok(None)
}

fn typed_fields(event: &stripe_webhook::Event) -> Option<Fields> {
    let mut f = Fields {
        id: event.id.as_str().to_owned(),
        kind: event.type_.as_str().to_owned(),
        created: event.created,
        ..Fields::default()
    };
    match &event.data.object {
        EventObject::CustomerSubscriptionCreated(s)
        | EventObject::CustomerSubscriptionUpdated(s)
        | EventObject::CustomerSubscriptionDeleted(s)
        | EventObject::CustomerSubscriptionPaused(s)
        | EventObject::CustomerSubscriptionResumed(s) => {
            f.customer = Some(s.customer.id().as_str().to_owned());
            f.subscription = Some(s.id.as_str().to_owned());
            f.status = Some(s.status.as_str().to_owned());
            for item in &s.items.data {
                f.prices.push(item.price.id.as_str().to_owned());
                f.prices.extend(item.price.lookup_key.clone());
            }
        }
        EventObject::PaymentMethodAttached(pm) => {
            f.customer = pm.customer.as_ref().map(|c| c.id().as_str().to_owned());
        }
        // Any other type: the few fields are read from the JSON.
        _ => return None,
    }
    Some(f)
}

/// The fields from the raw JSON: `data.object.customer` (a string or an expanded object), or
/// the object's own id when it is a customer; a subscription's status and prices.
fn json_fields(payload: &str) -> Option<Fields> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let object = &v["data"]["object"];
    let id_of = |c: &serde_json::Value| c.as_str().or_else(|| c["id"].as_str()).map(str::to_owned);
    let customer = match object["object"].as_str() {
        Some("customer") => id_of(&object["id"]),
        _ => id_of(&object["customer"]),
    };
    let is_subscription = object["object"].as_str() == Some("subscription");
    let mut prices = Vec::new();
    if is_subscription {
        for item in object["items"]["data"].as_array().into_iter().flatten() {
            prices.extend(item["price"]["id"].as_str().map(str::to_owned));
            prices.extend(item["price"]["lookup_key"].as_str().map(str::to_owned));
        }
    }
    Some(Fields {
        id: v["id"].as_str()?.to_owned(),
        kind: v["type"].as_str()?.to_owned(),
        created: v["created"].as_i64()?,
        customer,
        status: if is_subscription { object["status"].as_str().map(str::to_owned) } else { None },
        prices,
        subscription: if is_subscription { object["id"].as_str().map(str::to_owned) } else { None },
    })
}

/// Whether the `Stripe-Signature` value `header` carries a `v1` signature of `body` by `secret`
/// made within 300 s of `now`: Stripe's scheme (HMAC-SHA256 of `t.body`), over bytes, for
/// bodies async-stripe cannot take (it verifies a `&str`).
fn signed_bytes(header: &str, body: &[u8], secret: &str, now: i64) -> bool {
    let mut t = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => candidates.push(v),
            _ => {}
        }
    }
    let Some(t) = t.filter(|t| (now - t).abs() <= 300) else { return false };
    let mac = hmac_sha256(secret.as_bytes(), &[t.to_string().as_bytes(), b".", body]);
    candidates.iter().any(|c| {
        hex::decode(c)
            .is_ok_and(|sig| sig.len() == mac.len() && sig.iter().zip(mac).fold(0, |d, (a, b)| d | (a ^ b)) == 0)
    })
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts` under `key`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new().chain_update(block.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    Sha256::new().chain_update(block.map(|b| b ^ 0x5c)).chain_update(inner.finalize()).finalize().into()
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
