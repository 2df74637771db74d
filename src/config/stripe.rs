//! `[stripe]` and `[stripe.credits]`: the Stripe sink, its webhooks and prepaid credits.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::ConfigError;
use super::{export::host_only, validator::Validator, PlanSpec};
use crate::base::{MeterId, Period, PlanId};

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStripe {
    pub(crate) api_base: Option<String>,
    pub(crate) secret_key_file: Option<String>,
    pub(crate) webhook_secret_file: Option<String>,
    pub(crate) event_destination_secret_file: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) invoice_grace: Option<String>,
    pub(crate) past_due_grace: Option<String>,
    #[serde(default)]
    pub(crate) events: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) subscription_status: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) prices: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) plan_order: Vec<String>,
    pub(crate) credits: Option<RawCredits>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCredits {
    pub(crate) meter: String,
    #[serde(default)]
    pub(crate) prices: BTreeMap<String, i64>,
    pub(crate) expires_after: Option<String>,
    pub(crate) refunds: Option<String>,
    pub(crate) refund_attribution: Option<String>,
}

/// Stripe (`[stripe]`): where the API is, where secrets are read from (never from this file),
/// and which webhook events move tenants between plans.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StripeSettings {
    /// The API's base URL (`https://api.stripe.com/` by default; a local stand-in in tests).
    pub api_base: Option<String>,
    /// A file holding the secret API key; `STRIPE_SECRET_KEY` otherwise.
    pub secret_key_file: Option<std::path::PathBuf>,
    /// A file holding the webhook signing secrets (one per line, several during a rotation);
    /// `STRIPE_WEBHOOK_SECRET` (comma-separated) otherwise.
    pub webhook_secret_file: Option<std::path::PathBuf>,
    /// A file holding the signing secrets of the event destination that sends Stripe's thin
    /// meter error events; `STRIPE_EVENT_DESTINATION_SECRET` (comma-separated) otherwise. Without
    /// either, thin events are refused.
    pub event_destination_secret_file: Option<std::path::PathBuf>,
    /// How long one API call may take.
    pub timeout: Duration,
    /// How long after a billing period ends Stripe still takes its usage into the period's
    /// invoice (`invoice_grace`, Stripe's invoice finalization grace: 1 h by default, at most
    /// 72 h; set it to your account's). A `sum` meter's revision exported later than this
    /// after its window is stamped at export time, so it reaches an open invoice.
    pub invoice_grace: Duration,
    /// Event type → the plan its customer moves to (`"payment_method.attached" = "metered"`).
    pub events: BTreeMap<String, PlanId>,
    /// Subscription status → what an event of a subscription in that status does
    /// (`past_due = "free"`, `incomplete = "ignore"`). `active` and `trialing` map through
    /// [`prices`](Self::prices) unless listed here. When subscriptions are mapped at all (by
    /// price or by status), every status Stripe has has an outcome: the file is refused
    /// otherwise.
    pub subscription_status: BTreeMap<String, StatusOutcome>,
    /// How long a tenant whose subscription went `past_due` keeps the plan it gave before
    /// moving to `subscription_status.past_due`'s plan (`past_due_grace = "3d"`, at most 60
    /// days): the usage route and a `Tollgate-Past-Due` response header tell the tenant when; a
    /// payment within it (the subscription `active` again) cancels the move. `None` (the
    /// default): the move happens at once.
    pub past_due_grace: Option<Duration>,
    /// Price id or lookup key → plan, for active subscriptions.
    pub prices: BTreeMap<String, PlanId>,
    /// The plans subscriptions give, highest first (`plan_order`): when several live
    /// subscriptions of a customer give plans, the highest wins. Plans not listed rank below
    /// those listed; among equals, the subscription whose event came last wins.
    pub plan_order: Vec<PlanId>,
    /// Top-ups of prepaid balances from payments (`[stripe.credits]`), if configured.
    pub credits: Option<CreditSettings>,
}

/// Top-ups of prepaid balances from Stripe payments (`[stripe.credits]`): a paid checkout
/// session or invoice grants units, once per payment; a refund takes back what the refunded
/// money bought, from what the balance still holds first.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditSettings {
    /// The meter whose balance a payment tops up, unless the object's metadata names another
    /// (`tollgate_meter`). Some plan has a prepaid quota on it.
    pub meter: MeterId,
    /// Price id or lookup key → units granted per unit of quantity bought. A payment's units
    /// are the sum over its line items; an object whose metadata says `tollgate_units` grants
    /// that many instead.
    pub prices: BTreeMap<String, u64>,
    /// How long after the payment its grant expires (`expires_after`); never by default.
    pub expires_after: Option<Duration>,
    /// What a refund takes back.
    pub refunds: RefundPolicy,
    /// How money refunded of a payment that bought credits and other things is shared when
    /// nothing says which lines it was for (`refund_attribution`, `"pro_rata"` by default).
    pub refund_attribution: crate::base::RefundAttribution,
}

/// What a refund of a payment (`charge.refunded`) takes back from the grant it paid for
/// (`[stripe.credits] refunds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefundPolicy {
    /// `"proportional"` (the default): the units that the money refunded of the credit lines
    /// bought, at the grant's price per unit, at most the grant's units, from what the balance
    /// still holds first (see
    /// [`CreditRefund::units_for`](crate::store::CreditRefund::units_for)).
    Proportional,
    /// `"unspent"`: now the same as `"proportional"` (it took everything the grant held
    /// on any refund, a 1-cent one included, taking back units that were paid for). Kept so
    /// that configurations load.
    Unspent,
    /// `"ignore"`: refunds take nothing back (handle them by hand: `tollgate credits revoke`).
    Ignore,
}

/// What a webhook of a subscription in a given status does (`[stripe.subscription_status]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusOutcome {
    /// The tenant moves to this plan.
    Plan(PlanId),
    /// Nothing changes (`"ignore"`): said explicitly, so no status is left unmapped by
    /// oversight.
    Ignore,
}

impl Validator<'_, '_> {
    /// `[stripe]`: no secret here (they come from the environment or a file), plans that
    /// exist, statuses Stripe has.
    /// `[stripe.credits]`.
    pub(super) fn credits(
        &self,
        raw: &RawCredits,
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<CreditSettings, ConfigError> {
        let meter = MeterId::from(raw.meter.as_str());
        let prepaid = plans.values().any(|p| p.quotas.get(&meter).is_some_and(|q| q.period == Period::Prepaid));
        if !prepaid {
            return Err(self.invalid(
                "stripe.credits.meter",
                format!(
                    "no plan has a prepaid balance on `{}`: add quotas.{} = {{ period = \"prepaid\" }} to the plans that sell it",
                    raw.meter, raw.meter
                ),
            ));
        }
        let mut prices = BTreeMap::new();
        for (price, units) in &raw.prices {
            let path = format!("stripe.credits.prices.{price}");
            let units = self.positive(&path, *units)?.get();
            if units > crate::base::MAX_BALANCE {
                return Err(self.invalid(&path, "at most 2^50 units"));
            }
            prices.insert(price.clone(), units);
        }
        let expires_after = match raw.expires_after.as_deref() {
            None => None,
            Some(v) => Some(self.duration("stripe.credits.expires_after", Some(v), Duration::ZERO)?),
        };
        let refunds = match raw.refunds.as_deref().unwrap_or("proportional") {
            "proportional" => RefundPolicy::Proportional,
            "unspent" => RefundPolicy::Unspent,
            "ignore" => RefundPolicy::Ignore,
            other => {
                return Err(self.invalid(
                    "stripe.credits.refunds",
                    format!("expected \"proportional\", \"unspent\" or \"ignore\", not \"{other}\""),
                ))
            }
        };
        let refund_attribution = match raw.refund_attribution.as_deref().unwrap_or("pro_rata") {
            "pro_rata" => crate::base::RefundAttribution::ProRata,
            "credits_first" => crate::base::RefundAttribution::CreditsFirst,
            other => {
                return Err(self.invalid(
                    "stripe.credits.refund_attribution",
                    format!("expected \"pro_rata\" or \"credits_first\", not \"{other}\""),
                ))
            }
        };
        Ok(CreditSettings { meter, prices, expires_after, refunds, refund_attribution })
    }

    /// `[stripe] past_due_grace`: a duration of at most 60 days, meaningful only when
    /// `past_due` moves the tenant to a plan.
    fn past_due_grace(
        &self,
        raw: &RawStripe,
        statuses: &BTreeMap<String, super::StatusOutcome>,
    ) -> Result<Option<Duration>, ConfigError> {
        const KEY: &str = "stripe.past_due_grace";
        let Some(text) = raw.past_due_grace.as_deref() else { return Ok(None) };
        let grace = self.duration(KEY, Some(text), Duration::ZERO)?;
        if grace.is_zero() || grace > Duration::from_secs(60 * 86_400) {
            return Err(self.invalid(KEY, "expected a grace longer than zero and at most 60d"));
        }
        if !matches!(statuses.get("past_due"), Some(super::StatusOutcome::Plan(_))) {
            return Err(self.invalid(
                KEY,
                "a grace delays the move [stripe.subscription_status] past_due makes: map past_due to a plan \
                 (past_due = \"free\")",
            ));
        }
        Ok(Some(grace))
    }

    pub(super) fn stripe(
        &self,
        raw: &RawStripe,
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<StripeSettings, ConfigError> {
        const STATUSES: [&str; 8] =
            ["incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"];
        let api_base = match &raw.api_base {
            None => None,
            Some(url) if host_only(url) => Some(if url.ends_with('/') { url.clone() } else { format!("{url}/") }),
            Some(_) => {
                return Err(
                    self.invalid("stripe.api_base", "expected an http:// or https:// URL (no path after the host)")
                )
            }
        };
        let file = |key: &str, v: &Option<String>| -> Result<Option<std::path::PathBuf>, ConfigError> {
            match v {
                Some(p) if p.trim().is_empty() => Err(self.invalid(&format!("stripe.{key}"), "must not be empty")),
                v => Ok(v.as_ref().map(std::path::PathBuf::from)),
            }
        };
        let mut events = BTreeMap::new();
        for (event, plan) in &raw.events {
            let path = format!("stripe.events.\"{event}\"");
            if !event.contains('.') || event.contains(char::is_whitespace) {
                return Err(self.invalid(&path, "expected a Stripe event type such as \"payment_method.attached\""));
            }
            #[cfg(feature = "stripe")]
            if let Ok(stripe_webhook::EventType::Unknown(_)) = event.parse::<stripe_webhook::EventType>() {
                return Err(self.invalid(
                    &path,
                    format!(
                        "Stripe does not send `{event}` (not an event type of the API version tollgate's Stripe \
                         client knows): check its spelling, e.g. \"customer.subscription.deleted\""
                    ),
                ));
            }
            events.insert(event.clone(), self.plan_ref(plans, &path, plan)?);
        }
        let mut subscription_status = BTreeMap::new();
        for (status, plan) in &raw.subscription_status {
            let path = format!("stripe.subscription_status.{status}");
            if !STATUSES.contains(&status.as_str()) {
                return Err(self.invalid(
                    &path,
                    format!("`{status}` is not a subscription status: expected one of {}", STATUSES.join(", ")),
                ));
            }
            let outcome = if plan == "ignore" {
                if plans.contains_key(&PlanId::from("ignore")) {
                    return Err(self.invalid(
                        &path,
                        "`ignore` is both a plan and the keyword that leaves the tenant as it is: rename the plan",
                    ));
                }
                super::StatusOutcome::Ignore
            } else {
                super::StatusOutcome::Plan(self.plan_ref(plans, &path, plan)?)
            };
            subscription_status.insert(status.clone(), outcome);
        }
        let mut prices = BTreeMap::new();
        for (price, plan) in &raw.prices {
            let path = format!("stripe.prices.{price}");
            prices.insert(price.clone(), self.plan_ref(plans, &path, plan)?);
        }
        // Subscriptions mapped at all: every status has an outcome (`paused` left unmapped kept
        // a tenant on its paid plan). `active` and `trialing` go by price when prices are.
        if !raw.prices.is_empty() || !subscription_status.is_empty() {
            let missing: Vec<&str> = STATUSES
                .into_iter()
                .filter(|s| {
                    let by_price = matches!(*s, "active" | "trialing") && !raw.prices.is_empty();
                    !by_price && !subscription_status.contains_key(*s)
                })
                .collect();
            if !missing.is_empty() {
                return Err(self.invalid(
                    "stripe.subscription_status",
                    format!(
                        "every subscription status needs an outcome, a plan or \"ignore\" (`active` and `trialing` \
                         may go by [stripe.prices]): missing {}",
                        missing.join(", ")
                    ),
                ));
            }
        }
        let mut plan_order: Vec<PlanId> = Vec::new();
        for (i, plan) in raw.plan_order.iter().enumerate() {
            let path = format!("stripe.plan_order[{i}]");
            let id = self.plan_ref(plans, "stripe.plan_order", plan).map_err(|_| {
                self.invalid("stripe.plan_order", format!("unknown plan `{plan}` ({path}): declare it under [plans]"))
            })?;
            if plan_order.contains(&id) {
                return Err(self.invalid("stripe.plan_order", format!("`{plan}` is listed twice")));
            }
            plan_order.push(id);
        }
        // Several plans by price: which wins when a customer has several subscriptions must be
        // said (the latest event would, and a renewal of the cheaper one would downgrade).
        let priced: std::collections::BTreeSet<&PlanId> = prices.values().collect();
        if priced.len() > 1 {
            let missing: Vec<&str> = priced.iter().filter(|p| !plan_order.contains(p)).map(|p| p.as_str()).collect();
            if !missing.is_empty() {
                return Err(self.invalid(
                    "stripe.plan_order",
                    format!(
                        "[stripe.prices] gives several plans: list them in [stripe] plan_order, highest first, so \
                         that a customer with several subscriptions gets the highest (missing {})",
                        missing.join(", ")
                    ),
                ));
            }
        }
        let credits = raw.credits.as_ref().map(|c| self.credits(c, plans)).transpose()?;
        Ok(StripeSettings {
            credits,
            api_base,
            secret_key_file: file("secret_key_file", &raw.secret_key_file)?,
            webhook_secret_file: file("webhook_secret_file", &raw.webhook_secret_file)?,
            event_destination_secret_file: file("event_destination_secret_file", &raw.event_destination_secret_file)?,
            timeout: self.duration("stripe.timeout", raw.timeout.as_deref(), Duration::from_secs(30))?,
            invoice_grace: {
                let grace =
                    self.duration("stripe.invoice_grace", raw.invoice_grace.as_deref(), Duration::from_secs(3600))?;
                if grace > Duration::from_secs(72 * 3600) {
                    return Err(self.invalid(
                        "stripe.invoice_grace",
                        "at most 72h: Stripe finalizes an invoice at most 72 hours after its period ends",
                    ));
                }
                grace
            },
            past_due_grace: self.past_due_grace(raw, &subscription_status)?,
            events,
            subscription_status,
            prices,
            plan_order,
        })
    }
}
