//! What a webhook delivery did ([`WebhookOutcome`]) and the answer to it ([`WebhookReply`]).

use bytes::Bytes;
use http::StatusCode;

use crate::config::{MeterId, PlanId, TenantId};

/// The longest body a webhook delivery may have (larger ones are answered 413).
pub(super) const MAX_BODY: usize = 1 << 20;

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
    /// The subscription went `past_due` and `[stripe] past_due_grace` is set: the tenant
    /// keeps `plan` until `until`, then moves to `then` (the pass of
    /// [`Tollgate::check_past_due`](crate::Tollgate::check_past_due)), unless a payment brings
    /// the subscription back first. Recorded like an applied event.
    PastDue {
        /// The tenant.
        tenant: TenantId,
        /// Its plan, kept through the grace.
        plan: PlanId,
        /// When the grace ends (Unix seconds).
        until: i64,
        /// The plan it moves to then.
        then: PlanId,
    },
    /// A payment, refund or dispute recorded for tiers (and nothing else done with it): what
    /// the tenant has paid now, net, and the tier it moved to, if it moved.
    Paid {
        /// The tenant.
        tenant: TenantId,
        /// What it has paid, net, in the billing currency's smallest unit.
        paid: u64,
        /// The plan it moved to.
        tier: Option<PlanId>,
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
    /// A checkout session whose payment is only authorized (manual capture: a
    /// `capture_method` of `manual` in its `payment_method_options`), whatever its
    /// `payment_status`: nothing granted, as nothing was paid yet and no event says when it is.
    /// Counted as [`NotCredited`](Self::NotCredited) is, and logged: sell credits with
    /// automatic capture, or grant by hand once captured.
    NotCaptured {
        /// The checkout session.
        session: String,
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
    /// A dispute was won (`charge.dispute.funds_reinstated`, or `charge.dispute.closed` won):
    /// the units its withdrawal took from what the balance held were given back to the grant
    /// of its payment, once per dispute.
    Reinstated {
        /// The tenant.
        tenant: TenantId,
        /// The balance's meter.
        meter: MeterId,
        /// Units given back (0: the withdrawal took none of what the balance held, or has not
        /// come; it then takes nothing).
        units: u64,
    },
    /// A recharge's payment failed (`invoice.payment_failed`, or
    /// `invoice.payment_action_required`: 3-D Secure needed): counted against the tenant's
    /// recharge, once per recharge; `off` when the failures in a row turned it off.
    RechargeFailed {
        /// The tenant.
        tenant: TenantId,
        /// The balance's meter.
        meter: MeterId,
        /// The recharge's number.
        n: u64,
        /// Recharge is off since (the failures in a row reached `FAILURES_BEFORE_OFF`).
        off: bool,
    },
    /// Refused with 400: a missing, malformed, wrong or expired signature, or a body that is
    /// not an event. Nothing changed.
    Rejected(String),
    /// Refused with 413: a body longer than [`WebhookHandler::MAX_BODY`](crate::billing::WebhookHandler::MAX_BODY). Nothing changed.
    TooLarge,
    /// The store failed: 500, so Stripe delivers the event again. Nothing changed.
    StoreFailed(String),
    /// What the event lacks could not be read from Stripe's API (a payment's line items: no
    /// secret key, a timeout, an error): 500, so Stripe delivers the event again. Nothing
    /// changed.
    ApiFailed(String),
    /// Stripe refused a read the event needs for the key (401: rolled or revoked; 403: a
    /// restricted key without the permission; 404: a key of another account or mode): 500, so
    /// Stripe delivers the event again once the key can read it. Nothing changed; counted
    /// (`Stats::webhooks_api_refused`) and logged, once a minute per permission, with what the
    /// key lacks.
    ApiRefused {
        /// What the key lacks (`"Checkout Sessions: read (403: the restricted key lacks it)"`).
        permission: String,
    },
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
            WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_) | WebhookOutcome::ApiRefused { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::OK,
        }
    }

    /// The body: `{"received":true,"outcome":"applied"}`, or a problem+json for a refusal.
    #[must_use]
    pub fn body(&self) -> String {
        let outcome = match &self.outcome {
            WebhookOutcome::Applied { .. } => "applied",
            WebhookOutcome::PastDue { .. } => "past_due",
            WebhookOutcome::Credited { .. } => "credited",
            WebhookOutcome::Refunded { .. } => "refunded",
            WebhookOutcome::Reinstated { .. } => "reinstated",
            WebhookOutcome::RechargeFailed { .. } => "recharge_failed",
            WebhookOutcome::RefundKept { .. } => "refund_kept",
            WebhookOutcome::Paid { .. } => "paid",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::Stale => "stale",
            WebhookOutcome::UnknownCustomer => "unknown_customer",
            WebhookOutcome::FileTenant { .. } => "file_tenant",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::UnknownPrice => "unknown_price",
            WebhookOutcome::MeterError { .. } => "meter_error",
            WebhookOutcome::NotCredited { .. } => "not_credited",
            WebhookOutcome::PaymentUnknown { .. } => "payment_unknown",
            WebhookOutcome::NotCaptured { .. } => "not_captured",
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
                    "detail": format!("the body is longer than {MAX_BODY} bytes"),
                })
                .to_string()
            }
            WebhookOutcome::ApiRefused { permission } => {
                return serde_json::json!({
                    "type": "https://tollgate.rs/problems/stripe-refused",
                    "title": "Stripe API refused the key",
                    "status": 500,
                    "detail": format!("the payment's details could not be read with this key, which lacks {permission}; deliver it again once it can"),
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
