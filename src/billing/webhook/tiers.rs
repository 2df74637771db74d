//! Payments recorded for tiers (`[tiers.NAME]`): every payment, refund and dispute of a
//! tenant's Stripe customer goes into the quota store's ledger (`store/payments.rs`), and a
//! tenant on a ladder's plan moves, in the webhook that recorded the money, to the tier it now
//! unlocks (docs/tiers.md).
//!
//! What a payment is keyed by is what its refunds and disputes name: its payment intent
//! (an invoice's, read from Stripe's invoice payments), else its charge, else (an invoice paid
//! out of band, or no secret key to read its payment with) the invoice.

use serde_json::Value;

use super::{handler::WebhookHandler, WebhookOutcome};
use crate::{
    base::TenantId,
    billing::{reader::id_of, topup::manual_capture},
    config::Config,
    store::{DisputeStep, PaymentCall, PaymentOutcome},
};

/// What an event changes in the ledger, before its tenant is known.
#[derive(Debug)]
enum Change {
    Record { payment: String, amount: u64, currency: String, at: i64 },
    Refund { payment: String, refunded: u64 },
    Dispute { payment: String, dispute: String, amount: u64, step: DisputeStep },
}

impl Change {
    fn call(self, tenant: TenantId, billing: &str, at: i64) -> PaymentCall {
        match self {
            Self::Record { payment, amount, currency, at } => {
                PaymentCall::Record { tenant, payment, amount, currency, billing: billing.to_owned(), at }
            }
            Self::Refund { payment, refunded } => PaymentCall::Refund { tenant, payment, refunded, at },
            Self::Dispute { payment, dispute, amount, step } => {
                PaymentCall::Dispute { tenant, payment, dispute, amount, step, at }
            }
        }
    }

    /// Whether it takes money back (a ladder that moves down moves on it, and on it alone).
    fn reversal(&self) -> bool {
        !matches!(self, Self::Record { .. })
    }
}

impl WebhookHandler {
    /// Records the payment, refund or dispute `kind` carries in the tenant's ledger, when the
    /// configuration has tiers, and moves a tenant of the directory on a ladder's plan to the
    /// tier it now unlocks. Run after what else the event does (credits, plan transitions),
    /// whatever that answered, so that neither holds up the other. `Ok(Some(Paid))` once
    /// recorded; `Ok(None)` when it is not one, or names no tenant (Stripe is not read for an
    /// invoice's or a checkout's customer of no tenant; a dispute's customer is read from its
    /// payment intent); `Err` the answer (500: Stripe delivers it again; what was settled and
    /// the payment count once).
    pub(super) async fn tier_payment(
        &self,
        config: &Config,
        event: &str,
        kind: &str,
        created: i64,
        payload: &str,
    ) -> Result<Option<WebhookOutcome>, WebhookOutcome> {
        if config.tiers().is_empty() {
            return Ok(None);
        }
        let (Some(quota), Some(billing)) = (&self.quota, config.billing().currency.as_deref()) else {
            return Ok(None);
        };
        let Ok(body) = serde_json::from_str::<Value>(payload) else { return Ok(None) };
        if body["account"].is_string() {
            // A connected account's payment (Stripe Connect): not paid to this account.
            return Ok(None);
        }
        let o = &body["data"]["object"];
        let Some(change) = change_of(kind, created, o) else { return Ok(None) };
        // The tenant first: a customer of no tenant costs no read of Stripe. A dispute names no
        // customer: its payment intent's does.
        let customer = match &change {
            Change::Dispute { payment, dispute, .. } => {
                let customer = match id_of(&o["payment_intent"]) {
                    Some(intent) => self.customer_of_intent(event, intent).await?,
                    None => None,
                };
                if customer.is_none() {
                    tracing::warn!(%event, %dispute, %payment, "a dispute whose customer cannot be read (no secret \
                        key, or no payment intent): tiers do not count it");
                }
                customer
            }
            _ => id_of(&o["customer"]).map(str::to_owned),
        };
        let Some(customer) = customer else { return Ok(None) };
        let record = self.directory.tenant_by_customer(&customer).await.map_err(failed)?;
        let tenant = match &record {
            Some(r) => r.id.clone(),
            None => match config.tenants().iter().find(|t| t.stripe_customer() == Some(customer.as_str())) {
                Some(t) => t.id().clone(),
                None => return Ok(None),
            },
        };
        let change = match change {
            // An invoice's payment is keyed by its payment intent, which its refunds and
            // disputes name (read from its invoice payments).
            Change::Record { payment: invoice, amount, currency, at } if kind == "invoice.paid" => {
                let payment = match self.invoice_payment(&invoice).await {
                    Ok(Some(intent)) => intent,
                    // Paid out of band, or no key to read its payment with.
                    Ok(None) => invoice,
                    Err(e) => return Err(self.unreadable(event, "the invoice's payment", e)),
                };
                Change::Record { payment, amount, currency, at }
            }
            // Only authorized (manual capture): money once its payment intent says it
            // succeeded. No checkout event follows the capture: such a checkout counts if it is
            // delivered again once captured (as its credits are granted then).
            Change::Record { ref payment, .. } if manual_capture(o) && !self.intent_succeeded(event, o).await? => {
                tracing::warn!(%event, %tenant, %payment, "a checkout whose payment is only authorized (manual \
                    capture): tiers do not count it");
                return Ok(None);
            }
            change => change,
        };
        let now = self.clock.unix_secs();
        let reversal = change.reversal();
        let answer = quota.payments(&change.call(tenant.clone(), billing, now), now).await.map_err(failed)?;
        match answer.outcome {
            PaymentOutcome::Full => {
                // A fifth dispute of one payment (Stripe opens one per charge).
                tracing::error!(%event, %tenant, "tiers: a payment's disputes are at their bound: this one is not \
                    counted");
            }
            PaymentOutcome::OtherCurrency => {
                tracing::info!(%event, %tenant, "a payment in another currency than [billing] currency: tiers do not count it");
            }
            _ => {}
        }
        let moved = match record {
            Some(record) => {
                let tenant = record.id.clone();
                let moves = crate::store::climb(&**quota, &*self.directory, &*self.node, config, record, now, reversal)
                    .await
                    .map_err(WebhookOutcome::StoreFailed)?;
                for (from, to) in &moves {
                    self.record_plan(&tenant, crate::store::Actor::Stripe(event.to_owned()), Some(from), to).await;
                }
                moves.into_iter().last().map(|(_, to)| to)
            }
            None => None,
        };
        Ok(Some(WebhookOutcome::Paid { tenant, paid: answer.standing.paid, tier: moved }))
    }

    /// A payment in the fleet's tallies (`paid_minor`, the currency's smallest unit, before
    /// refunds and disputes), in the minute it was paid and its tenant's day, once per event
    /// (the batch's id is the event's). Not a payment, another currency, no usage store: nothing.
    /// A failure is logged: the event's answer does not change (Stripe would deliver it again
    /// for a figure of the dashboard's).
    pub(super) async fn tally_payment(
        &self,
        config: &Config,
        event: &str,
        kind: &str,
        created: i64,
        payload: &str,
    ) -> Result<(), WebhookOutcome> {
        use crate::store::{FlushId, Tally, TallyScope, UsageBatch, TALLY_PAID};
        let (Some(usage), Some(billing)) = (&self.usage, config.billing().currency.as_deref()) else { return Ok(()) };
        let Ok(body) = serde_json::from_str::<Value>(payload) else { return Ok(()) };
        if body["account"].is_string() {
            return Ok(());
        }
        let o = &body["data"]["object"];
        let Some(Change::Record { amount, currency, at, .. }) = change_of(kind, created, o) else { return Ok(()) };
        if !currency.eq_ignore_ascii_case(billing) {
            return Ok(());
        }
        let now = self.clock.unix_secs();
        // Paid in the future by a clock ahead: counted now.
        let at = at.min(now);
        let mut tallies =
            vec![Tally::new(TallyScope::Fleet, at - at.rem_euclid(60), vec![(TALLY_PAID.to_owned(), amount)])];
        let tenant = match id_of(&o["customer"]) {
            Some(customer) => match self.directory.tenant_by_customer(customer).await {
                Ok(Some(r)) => Some(r.id),
                Ok(None) => {
                    config.tenants().iter().find(|t| t.stripe_customer() == Some(customer)).map(|t| t.id().clone())
                }
                Err(e) => return Err(failed(e)),
            },
            None => None,
        };
        if let Some(tenant) = tenant {
            let day = at - at.rem_euclid(86_400);
            tallies.push(Tally::new(TallyScope::Tenant(tenant), day, vec![(TALLY_PAID.to_owned(), amount)]));
        }
        let batch = UsageBatch::new(FlushId::new(format!("stripe-paid-{event}")), Vec::new()).with_tallies(tallies);
        usage.commit_usage(&batch).await.map(drop).map_err(failed)
    }

    /// The customer of payment intent `intent`, read from Stripe (`None` without a key).
    async fn customer_of_intent(&self, event: &str, intent: &str) -> Result<Option<String>, WebhookOutcome> {
        let Some(reader) = &self.reader else { return Ok(None) };
        if !intent.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Ok(None);
        }
        match reader.get(&format!("v1/payment_intents/{intent}")).await {
            Ok(pi) => Ok(id_of(&pi["customer"]).map(str::to_owned)),
            Err(e) => Err(self.unreadable(event, "the disputed payment", e)),
        }
    }
}

fn failed(e: crate::store::StoreError) -> WebhookOutcome {
    WebhookOutcome::StoreFailed(e.to_string())
}

/// The ledger's change an event carries, if it is a payment, a refund or a dispute's
/// withdrawal or reinstatement (an invoice's payment keyed by the invoice until its payment
/// intent is read).
fn change_of(kind: &str, created: i64, o: &Value) -> Option<Change> {
    Some(match kind {
        "invoice.paid" => {
            let amount = o["amount_paid"].as_u64().filter(|a| *a > 0)?;
            let invoice = id_of(&o["id"])?;
            let at = o["status_transitions"]["paid_at"].as_i64().unwrap_or(created);
            let currency = o["currency"].as_str().unwrap_or_default().to_owned();
            Change::Record { payment: invoice.to_owned(), amount, currency, at }
        }
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            // A subscription's checkout is recorded by its invoice's `invoice.paid`, and so is
            // a payment's checkout that made an invoice (`invoice_creation`): counted once.
            if o["mode"] != "payment" || o["payment_status"] != "paid" || id_of(&o["invoice"]).is_some() {
                return None;
            }
            let amount = o["amount_total"].as_u64().filter(|a| *a > 0)?;
            let payment = id_of(&o["payment_intent"]).or_else(|| id_of(&o["id"]))?;
            let currency = o["currency"].as_str().unwrap_or_default().to_owned();
            Change::Record { payment: payment.to_owned(), amount, currency, at: created }
        }
        "charge.refunded" => {
            let refunded = o["amount_refunded"].as_u64()?;
            let payment = id_of(&o["payment_intent"]).or_else(|| id_of(&o["id"]))?;
            Change::Refund { payment: payment.to_owned(), refunded }
        }
        "charge.dispute.funds_withdrawn" | "charge.dispute.funds_reinstated" => {
            let step = if kind.ends_with("withdrawn") { DisputeStep::Withdrawn } else { DisputeStep::Reinstated };
            let (dispute, amount) = (id_of(&o["id"])?, o["amount"].as_u64()?);
            let payment = id_of(&o["payment_intent"]).or_else(|| id_of(&o["charge"]))?;
            Change::Dispute { payment: payment.to_owned(), dispute: dispute.to_owned(), amount, step }
        }
        _ => return None,
    })
}
