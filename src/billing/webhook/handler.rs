//! The handler: a delivery verified, read, and sent on to the credits, the plan transitions or
//! the event destination; what it did and the answer to it.

use std::{fmt, sync::Arc};

use stripe_webhook::{Webhook, WebhookError};

use super::{
    destination::{is_thin, thin_event, Destination},
    outcome::{WebhookOutcome, WebhookReply},
    transition::{json_fields, transition, typed_fields, Fields},
    verify::signed_bytes,
};
use crate::{
    billing::{reader::StripeReader, Secret},
    clock::Clock,
    config::Config,
    store::{
        limited::{Limited, Path, Policy},
        DirectoryEvents, DirectoryStore, QuotaStore, WebhookCount,
    },
};

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
/// - The new plan applies at once on this node, within a second elsewhere (the directory's feed
///   of tenants changed; within `limits.directory_ttl` when the feed could not be told).
pub struct WebhookHandler {
    /// The policy of its store calls: background calls, within `limits.background_timeout`.
    calls: Arc<Policy>,
    pub(in crate::billing) directory: Arc<dyn DirectoryStore>,
    pub(in crate::billing) node: Arc<dyn DirectoryEvents>,
    pub(in crate::billing) config: Arc<dyn Fn() -> Config + Send + Sync>,
    pub(in crate::billing) clock: Clock,
    secrets: Vec<Secret>,
    /// Where prepaid balances are topped up (`[stripe.credits]`).
    pub(in crate::billing) quota: Option<Arc<dyn QuotaStore>>,
    /// Where the plan changes it makes are recorded, with the event's id as who.
    pub(in crate::billing) audit: Option<Arc<dyn crate::store::AuditStore>>,
    /// Where each payment is added to the fleet's tallies (the overview's money paid today).
    pub(in crate::billing) usage: Option<Arc<dyn crate::store::UsageStore>>,
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
    pub const MAX_BODY: usize = super::outcome::MAX_BODY;

    /// A handler over the parts it uses, for a process that handles webhooks without serving
    /// requests (a webhook-only function): the directory plans are changed in, who is told of
    /// a change (`node`; the engine, when there is one: see
    /// [`Tollgate::webhook_handler`](crate::Tollgate::webhook_handler)), the
    /// configuration in force (read at each delivery, so a reload applies), the clock
    /// signatures are checked against, and the signing secrets. Each store call is bounded by
    /// the configuration's `limits.background_timeout` as it was at this call. A `node` of
    /// its own writes recharges' alerts only if its
    /// [`recharge`](crate::store::DirectoryEvents::recharge) does (the default does nothing).
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
            audit: None,
            usage: None,
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

    /// Records each plan change it makes in `audit` (the directory's store), by the event's id
    /// (a handler made by [`Tollgate::webhook_handler`](crate::Tollgate::webhook_handler) uses the
    /// engine's).
    #[must_use]
    pub fn with_audit(mut self, audit: Arc<dyn crate::store::AuditStore>) -> Self {
        self.audit = Some(Arc::new(Limited::new(audit, self.calls.clone(), Path::Background)));
        self
    }

    /// Adds each payment (a paid invoice, a paid checkout of a payment that made no invoice) in
    /// the billing currency to the fleet's tallies in `usage` (the usage store), its tenant's
    /// too, exactly once per event: the dashboard's money paid today (a handler made by
    /// [`Tollgate::webhook_handler`](crate::Tollgate::webhook_handler) uses the engine's).
    #[must_use]
    pub fn with_usage(mut self, usage: Arc<dyn crate::store::UsageStore>) -> Self {
        self.usage = Some(Arc::new(Limited::new(usage, self.calls.clone(), Path::Background)));
        self
    }

    /// Records a plan change of `tenant` from `from` to `to` made by `actor`, if it moved.
    pub(in crate::billing) async fn record_plan(
        &self,
        tenant: &crate::base::TenantId,
        actor: crate::store::Actor,
        from: Option<&crate::base::PlanId>,
        to: &crate::base::PlanId,
    ) {
        let Some(audit) = &self.audit else { return };
        if from == Some(to) {
            return;
        }
        let at = self.clock.unix_nanos() / 1_000_000;
        let record = crate::store::AuditRecord::new(
            tenant.clone(),
            at,
            actor,
            crate::store::Setting::Plan,
            from.map(ToString::to_string),
            Some(to.to_string()),
        );
        crate::store::append_audit(audit.as_ref(), &record).await;
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

    /// The configuration in force.
    pub(in crate::billing) fn config_now(&self) -> Config {
        (self.config)()
    }

    /// Reads Stripe's API with `reader` (a recharge charger's: the same key).
    pub(crate) fn with_reader(mut self, reader: Arc<StripeReader>) -> Self {
        self.reader = Some(reader);
        self
    }

    /// The reader of Stripe's API, when a secret key was given.
    pub(crate) fn reader(&self) -> Option<Arc<StripeReader>> {
        self.reader.clone()
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
            | WebhookOutcome::PastDue { .. }
            | WebhookOutcome::Credited { .. }
            | WebhookOutcome::Refunded { .. }
            | WebhookOutcome::Reinstated { .. }
            | WebhookOutcome::RechargeFailed { .. }
            | WebhookOutcome::RefundKept { .. }
            | WebhookOutcome::Paid { .. } => WebhookCount::Applied,
            WebhookOutcome::Rejected(_) | WebhookOutcome::TooLarge => WebhookCount::Rejected,
            WebhookOutcome::MeterError { .. } => WebhookCount::MeterError,
            WebhookOutcome::NotCredited { .. }
            | WebhookOutcome::PaymentUnknown { .. }
            | WebhookOutcome::NotCaptured { .. } => WebhookCount::NotCredited,
            WebhookOutcome::ApiRefused { .. } => WebhookCount::ApiRefused,
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
                return destination.receive(thin, &*self.node).await;
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
        // What the event does (credits, subscriptions, plan transitions), then the money it
        // pays (or takes back) counted for tiers and the tier it unlocks moved to, each
        // whatever the other answered: nothing of tiers (a read of Stripe failing) holds up a
        // credit or a plan, and no settlement failing for days (a chargeback a grant cannot
        // take) holds up the count past Stripe's retries. Either failing is answered 500 and
        // delivered again: each records once (the ledger once per payment).
        let outcome = self.settle_event(&config, settings, &fields, payload).await;
        let tiers = self.tier_payment(&config, &fields.id, &fields.kind, fields.created, payload).await;
        let tallied = self.tally_payment(&config, &fields.id, &fields.kind, fields.created, payload).await;
        if matches!(
            outcome,
            WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_) | WebhookOutcome::ApiRefused { .. }
        ) {
            return outcome;
        }
        match (tiers, tallied) {
            (Err(failed), _) | (Ok(_), Err(failed)) => failed,
            (Ok(paid), Ok(())) if outcome == WebhookOutcome::Ignored => paid.unwrap_or(WebhookOutcome::Ignored),
            (Ok(_), Ok(())) => outcome,
        }
    }

    /// What a verified event does besides tiers: credits, subscriptions, plan transitions.
    async fn settle_event(
        &self,
        config: &Config,
        settings: &crate::config::StripeSettings,
        fields: &Fields,
        payload: &str,
    ) -> WebhookOutcome {
        // A payment that tops up a prepaid balance; other payments go on to the plan
        // transitions.
        if let Some(credits) = &settings.credits {
            if let Some(outcome) = self.payment_event(config, credits, &fields.id, &fields.kind, payload).await {
                // A payment whose event is also a configured plan transition moves the plan too
                // (once its credits are settled: a failure is delivered again, whole).
                let failed = matches!(
                    outcome,
                    WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_) | WebhookOutcome::ApiRefused { .. }
                );
                // A recharge's invoice never moves the plan: a decline is one of the three
                // failures recharge allows, not a subscription's payment failing.
                if failed || !settings.events.contains_key(&fields.kind) || recharge_invoice(payload) {
                    return outcome;
                }
                tracing::info!(event = %fields.id, kind = %fields.kind, ?outcome, "credits settled; now the plan transition");
            }
        }
        if let Some(subscription) = fields.subscription.clone() {
            return self.subscription_event(config, settings, fields, &subscription).await;
        }
        let plan = match transition(settings, fields) {
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
        self.customer_event(config, settings, fields, &customer, plan).await
    }
}

/// A refusal (logged by [`WebhookHandler::handle`], at most once a second).
fn reject(reason: &str) -> WebhookOutcome {
    WebhookOutcome::Rejected(reason.to_owned())
}

/// Whether the event's object is a recharge's invoice (its metadata names the recharge).
fn recharge_invoice(payload: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(payload)
        .is_ok_and(|v| crate::billing::metadata::is_recharge(&v["data"]["object"]))
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
