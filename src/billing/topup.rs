//! Top-ups of prepaid balances from verified Stripe payments (`[stripe.credits]`): a paid
//! checkout session or invoice grants units once per payment, a refund takes back its share of
//! what the grant still holds.
//!
//! Stripe sends one payment more than once, in more than one shape: a subscription's checkout
//! sends `checkout.session.completed` and `invoice.paid` for the same payment, a delayed
//! payment method sends `checkout.session.completed` unpaid and then
//! `checkout.session.async_payment_succeeded`, and any event may be delivered again. So:
//!
//! - a grant's id is the payment's, never the event's: the invoice's id when there is an
//!   invoice (the session names it), else the payment intent's; the quota store adds a grant
//!   once per id, so the second shape of a payment is a duplicate;
//! - only a paid object grants (`payment_status = "paid"`, an invoice's `status = "paid"`);
//! - a checkout session's events carry no line items: they are read from the API (`GET
//!   /v1/checkout/sessions/{id}/line_items`), as an invoice's lines past the ten it embeds
//!   (`GET /v1/invoices/{id}/lines`); metadata `tollgate_units` on the object grants that many
//!   units instead.

mod payment;

use std::{collections::HashMap, sync::Arc};

use serde_json::Value;

use super::{
    reader::{id_of, ReadError, StripeAccess, StripeReader},
    webhook::{WebhookHandler, WebhookOutcome},
};
use crate::{
    config::{Config, CreditSettings, MeterId, RefundPolicy, TenantId},
    store::{CreditGrant, CreditRefund, RefundOutcome},
};

/// The metadata key of a checkout session or invoice that says how many units it grants,
/// instead of its prices.
pub(crate) const UNITS_KEY: &str = "tollgate_units";

/// The billing reasons of a subscription's period invoices: its first and its renewals.
const PERIOD_REASONS: [&str; 2] = ["subscription_create", "subscription_cycle"];

/// A checkout session's or invoice's own metadata `key`; else, on an invoice of a
/// subscription's period (`billing_reason` `subscription_create` or `subscription_cycle`), its
/// subscription's (`parent.subscription_details.metadata`: a renewal invoice's own is empty).
/// Stripe copies the subscription's metadata onto every invoice of it, a mid-period change
/// (`subscription_update`), a threshold or a one-off invoice too: those are read by their own
/// metadata or lines only, so that a proration never grants a period's units.
pub(crate) fn named<'o>(o: &'o Value, key: &str, session: bool) -> &'o Value {
    match &o["metadata"][key] {
        Value::Null if !session && o["billing_reason"].as_str().is_some_and(|r| PERIOD_REASONS.contains(&r)) => {
            &o["parent"]["subscription_details"]["metadata"][key]
        }
        own => own,
    }
}
/// The metadata key that names the balance's meter, instead of `[stripe.credits] meter`.
pub(crate) const METER_KEY: &str = "tollgate_meter";
/// How long after a payment its unknown customer is answered 500 (delivered again).
const UNKNOWN_CUSTOMER_GRACE_SECS: i64 = 86_400;
/// The most pages of line items (100 each) read for one payment.
const MAX_PAGES: usize = 10;

/// Why a payment's line items were not read.
#[derive(Debug)]
enum LinesError {
    /// No secret key to read them with.
    NoKey,
    /// More than [`MAX_PAGES`] pages of them.
    TooMany,
    /// The API failed.
    Read(ReadError),
}

/// A line item of a payment: the price's id and lookup key, and the quantity bought; a line
/// that buys nothing (it charges nothing or prorates) keeps its keys apart, to be reported.
#[derive(Debug)]
struct Line {
    /// The line's id (an invoice line's `il_…`), which credit notes name.
    id: Option<String>,
    keys: Vec<String>,
    quantity: u64,
    /// What the line charged: an invoice line's `amount` less its discounts and pre-tax
    /// credits, plus its exclusive tax; a session line's `amount_total`.
    amount: u64,
    /// Of `amount`, what pre-payment credit notes credited (it buys that much less).
    credited: u64,
    skipped: Vec<String>,
    /// A proration line: what it charges (a credit: less than 0), its subscription item, and
    /// the invoice a credit credits.
    proration: Option<Proration>,
}

/// A proration line of an invoice: a change of quantity or price mid-period is a credit for
/// the unused time of the old (naming the invoice it credits) and a charge for the rest of the
/// new, on the same subscription item.
#[derive(Debug)]
struct Proration {
    /// What it charges, net of its discounts, pre-tax credits and exclusive tax: a credit is
    /// negative.
    money: i64,
    /// The subscription item it prorates.
    item: Option<String>,
    /// Its subscription.
    subscription: Option<String>,
    /// The invoice it credits (`proration_details.credited_items.invoice`).
    invoice: Option<String>,
}

impl Line {
    /// The units it buys at `per` a quantity: less the share its pre-payment credit notes
    /// credited.
    fn units(&self, per: u64) -> u128 {
        let whole = u128::from(per) * u128::from(self.quantity);
        match self.credited {
            0 => whole,
            c if c >= self.amount => 0,
            c => whole * u128::from(self.amount - c) / u128::from(self.amount),
        }
    }

    /// What the customer paid for it.
    fn paid(&self) -> u64 {
        self.amount.saturating_sub(self.credited)
    }
}

/// A line item of a checkout session (`item`) or an invoice (`line_item`), in any API version:
/// `price` (an id or an object with `id` and `lookup_key`) or, from 2025, `pricing.price_details.price`.
/// A line that charges nothing (an amount of 0 or less after its discounts: a credit for
/// unused time, a free trial, a pack given away) or prorates buys nothing: proration lines carry the full quantity for part of the
/// price.
/// What an invoice line (or a credit note's line) comes to: its `amount` (gross) less its
/// `discount_amounts` and the billing credits among its `pretax_credit_amounts` (`type`
/// `credit_balance_transaction`: a coupon is listed in both arrays, its `discount` entry
/// there is not subtracted again), plus its exclusive `taxes`; `None` without an `amount`.
fn net_amount(v: &Value) -> Option<i64> {
    let sum = |list: &Value, counted: &dyn Fn(&Value) -> bool| {
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|a| counted(a))
            .fold(0i64, |t, a| t.saturating_add(a["amount"].as_i64().unwrap_or(0).max(0)))
    };
    v["amount"].as_i64().map(|a| {
        a.saturating_sub(sum(&v["discount_amounts"], &|_| true))
            .saturating_sub(sum(&v["pretax_credit_amounts"], &|c| c["type"] == "credit_balance_transaction"))
            .saturating_add(sum(&v["taxes"], &|t| t["tax_behavior"] == "exclusive"))
    })
}

fn line_of(v: &Value) -> Line {
    // What the customer paid for it: an invoice line's `amount` is before its discounts, its
    // pre-tax credits and its exclusive tax; a checkout line's `amount_total` counts them.
    let amount = net_amount(v).or_else(|| v["amount_total"].as_i64());
    let parent = &v["parent"];
    let prorated = v["proration"] == true
        || parent["subscription_item_details"]["proration"] == true
        || parent["invoice_item_details"]["proration"] == true;
    let mut keys = Vec::new();
    for price in [&v["price"], &v["pricing"]["price_details"]["price"], &v["plan"]] {
        if let Some(id) = id_of(price) {
            keys.push(id.to_owned());
        }
        if let Some(key) = price["lookup_key"].as_str() {
            keys.push(key.to_owned());
        }
    }
    let id = id_of(&v["id"]).map(str::to_owned);
    // A line that charges nothing (a free or fully discounted one) buys nothing.
    if amount.is_some_and(|a| a <= 0) || prorated {
        let proration = prorated.then(|| proration_of(v)).flatten();
        return Line { id, keys: Vec::new(), quantity: 0, amount: 0, credited: 0, skipped: keys, proration };
    }
    let amount = amount.and_then(|a| u64::try_from(a).ok()).unwrap_or(0);
    // A line without a quantity (usage-based) buys no pack.
    Line {
        id,
        keys,
        quantity: v["quantity"].as_u64().unwrap_or(0),
        amount,
        credited: 0,
        skipped: Vec::new(),
        proration: None,
    }
}

/// A proration line's [`Proration`], in any API version (`None` without an `amount`). A
/// credit's discounts and pre-tax credits lower it, its exclusive tax raises it, as they do a
/// charge.
fn proration_of(v: &Value) -> Option<Proration> {
    let parent = &v["parent"];
    let sum = |list: &Value, counted: &dyn Fn(&Value) -> bool| {
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|a| counted(a))
            .fold(0i64, |t, a| t.saturating_add(a["amount"].as_i64().unwrap_or(0).saturating_abs()))
    };
    let amount = v["amount"].as_i64()?;
    let money = if amount >= 0 {
        net_amount(v)?
    } else {
        let credit = amount
            .saturating_abs()
            .saturating_sub(sum(&v["discount_amounts"], &|_| true))
            .saturating_sub(sum(&v["pretax_credit_amounts"], &|c| c["type"] == "credit_balance_transaction"))
            .saturating_add(sum(&v["taxes"], &|t| t["tax_behavior"] == "exclusive"));
        -credit.max(0)
    };
    let details = [&parent["subscription_item_details"], &parent["invoice_item_details"], v];
    let invoice = details.iter().find_map(|d| id_of(&d["proration_details"]["credited_items"]["invoice"]));
    let item = [&parent["subscription_item_details"]["subscription_item"], &v["subscription_item"]]
        .into_iter()
        .find_map(id_of);
    let subscription = [
        &parent["subscription_item_details"]["subscription"],
        &parent["invoice_item_details"]["subscription"],
        &v["subscription"],
    ]
    .into_iter()
    .find_map(id_of);
    Some(Proration {
        money,
        item: item.map(str::to_owned),
        subscription: subscription.map(str::to_owned),
        invoice: invoice.map(str::to_owned),
    })
}

/// The invoice `intent` paid, from the invoices' payments (API versions from 2025-03-31 name
/// it nowhere else); `None` for a payment of no invoice (a checkout in payment mode).
pub(super) async fn invoice_of_payment(reader: &StripeReader, intent: &str) -> Result<Option<String>, ReadError> {
    if !intent.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Ok(None);
    }
    let page = reader
        .get(&format!(
            "v1/invoice_payments?payment%5Btype%5D=payment_intent&payment%5Bpayment_intent%5D={intent}&limit=10"
        ))
        .await?;
    Ok(page["data"].as_array().and_then(|payments| {
        payments.iter().find(|p| p["status"] == "paid").and_then(|p| id_of(&p["invoice"]).map(str::to_owned))
    }))
}

/// Whether a checkout session's payment may be only authorized: manual capture for one of its
/// payment methods (credits and tiers count it once captured).
pub(in crate::billing) fn manual_capture(o: &Value) -> bool {
    o["payment_method_options"]
        .as_object()
        .is_some_and(|options| options.values().any(|method| method["capture_method"] == "manual"))
}

/// The answer to a checkout session whose payment is only authorized (manual capture):
/// nothing granted, logged, counted as not credited.
fn not_captured(event: &str, kind: &str, o: &Value) -> WebhookOutcome {
    let session = id_of(&o["id"]).unwrap_or("-").to_owned();
    tracing::warn!(%event, %kind, %session,
        "a checkout session whose payment is only authorized (manual capture): no credits granted, and no checkout \
         event follows the capture; sell credits with automatic capture, or grant by hand once captured \
         (tollgate credits grant)");
    WebhookOutcome::NotCaptured { session }
}

/// What the pre-payment credit notes of `invoice` credited, by invoice line (void notes, and
/// post-payment ones, which refunds handle, left out).
async fn pre_payment_credits(
    reader: &StripeReader,
    invoice: &str,
) -> Result<std::collections::HashMap<String, u64>, ReadError> {
    if !invoice.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ReadError::permanent(format!("`{invoice}` is not an object id")));
    }
    let notes = reader.get(&format!("v1/credit_notes?invoice={invoice}&limit=100")).await?;
    let mut credited = std::collections::HashMap::new();
    for note in notes["data"].as_array().into_iter().flatten() {
        let (pre, of) = note_share(note, true);
        if note["status"] == "void" || pre == 0 {
            continue;
        }
        for line in note["lines"]["data"].as_array().into_iter().flatten() {
            if let Some(il) = id_of(&line["invoice_line_item"]) {
                let amount = u128::try_from(net_amount(line).unwrap_or(0).max(0)).unwrap_or(0);
                let share = (amount * u128::from(pre) / u128::from(of.max(1))) as u64;
                let c: &mut u64 = credited.entry(il.to_owned()).or_default();
                *c = c.saturating_add(share);
            }
        }
    }
    Ok(credited)
}

/// Which money of a post-payment credit note: its refunded part (`refunds[].amount_refunded`),
/// or its part credited to the customer's balance (`customer_balance_transaction`) or out of
/// band (`out_of_band_amount`): the rest of its post-payment amount (Stripe's API reference,
/// "The Credit Note object").
#[derive(Clone, Copy, PartialEq, Eq)]
enum NotePart {
    Refunded,
    Credited,
}

/// The money `note` refunded: the sum of its `refunds[].amount_refunded`.
fn note_refunded(note: &Value) -> u64 {
    note["refunds"]
        .as_array()
        .into_iter()
        .flatten()
        .fold(0u64, |t, r| t.saturating_add(r["amount_refunded"].as_u64().unwrap_or(0)))
}

/// The money of `note`'s post-payment part credited to the customer's balance or out of band:
/// its post-payment amount less what it refunded.
fn note_credited(note: &Value) -> u64 {
    let (post, of) = note_share(note, false);
    let amount = note["amount"].as_u64().unwrap_or(0);
    let post_total = (u128::from(amount) * u128::from(post) / u128::from(of.max(1))) as u64;
    post_total.saturating_sub(note_refunded(note))
}

/// The money of `note`'s lines on `credit_lines` (invoice line ids), of its post-payment part,
/// of `part` of it (shared by what the note refunded against what it credited to the
/// customer's balance or out of band).
fn note_money(note: &Value, credit_lines: &[String], part: NotePart) -> u64 {
    let (post, of) = note_share(note, false);
    let refunded = note_refunded(note);
    let credited = note_credited(note);
    let (share, whole) = match part {
        _ if refunded.saturating_add(credited) == 0 => (u64::from(part == NotePart::Refunded), 1),
        NotePart::Refunded => (refunded, refunded.saturating_add(credited)),
        NotePart::Credited => (credited, refunded.saturating_add(credited)),
    };
    let mut money = 0u64;
    for line in note["lines"]["data"].as_array().into_iter().flatten() {
        if id_of(&line["invoice_line_item"]).is_some_and(|il| credit_lines.iter().any(|c| c == il)) {
            let amount = u128::try_from(net_amount(line).unwrap_or(0).max(0)).unwrap_or(0);
            let posted = amount * u128::from(post) / u128::from(of.max(1));
            money = money.saturating_add((posted * u128::from(share) / u128::from(whole.max(1))) as u64);
        }
    }
    money
}

/// The part of a credit note issued before the invoice was paid (`pre`) or after it, as
/// `(part, of)`: `type` `pre_payment` all of it, `post_payment` none, `mixed` its
/// `pre_payment_amount` (or `post_payment_amount`) of its `amount`.
fn note_share(note: &Value, pre: bool) -> (u64, u64) {
    let amount = note["amount"].as_u64().unwrap_or(0);
    match (note["type"].as_str(), pre) {
        (Some("pre_payment"), true) | (Some("post_payment"), false) => (1, 1),
        (Some("pre_payment"), false) | (Some("post_payment"), true) => (0, 1),
        (_, true) => (note["pre_payment_amount"].as_u64().unwrap_or(0).min(amount), amount),
        (_, false) => (note["post_payment_amount"].as_u64().unwrap_or(amount).min(amount), amount),
    }
}

/// What the secret key (`stripe.secret_key_file` or `STRIPE_SECRET_KEY`) may read of what
/// `[stripe.credits]` needs: Stripe cannot list a key's permissions, so one list call each
/// (`limit=1`) of checkout sessions, invoices, invoice payments and credit notes, of refunds
/// unless `refunds = "ignore"`, and of prices when `[stripe.credits.prices]` names lookup keys
/// or a plan recharges (the writes a recharge makes, Invoices and Invoice items, cannot be
/// asked without making one). A read refused (401, 403, 404) is named in
/// [`StripeAccess::refused`]: payments that need it are answered 500 until the key can read
/// it. `tollgate check` prints it; a node logs it when it builds its webhook handler.
///
/// # Errors
/// No `[stripe.credits]`, or no secret key.
pub async fn check_stripe_access(config: &Config) -> Result<StripeAccess, super::StripeSetupError> {
    use super::StripeSetupError;
    let missing = || StripeSetupError::MissingSecret { env: "STRIPE_SECRET_KEY", file_key: "secret_key_file" };
    let stripe = config.stripe().ok_or_else(missing)?;
    let credits = stripe.credits.as_ref().ok_or_else(missing)?;
    let key = super::read_secrets(stripe.secret_key_file.as_deref(), "STRIPE_SECRET_KEY", "secret_key_file")?
        .into_iter()
        .next()
        .ok_or_else(missing)?;
    let reader = StripeReader::new(key, stripe.api_base.as_deref(), stripe.timeout);
    Ok(reader.probe(&credit_reads_of(config, credits)).await)
}

/// The lists `credits` needs a key to read: prices too when some plan recharges (a
/// recharge's amount is read from its price).
fn credit_reads_of(config: &Config, credits: &CreditSettings) -> Vec<&'static str> {
    let recharges = config.plans().values().any(|p| p.recharges().next().is_some());
    let mut reads = super::reader::credit_reads(
        credits.refunds != RefundPolicy::Ignore,
        recharges || credits.prices.keys().any(|k| super::prices::is_lookup_key(k)),
    );
    // A recharge's delivery reads whether its invoice's payment is processing (a bank debit).
    if recharges {
        reads.push("v1/payment_intents");
    }
    reads
}

/// Asks, in the background, what `reader` may read of what `credits` needs, and logs what is
/// refused (an error) or that Stripe could not be asked (a warning: a start without Stripe is
/// no fault).
pub(crate) fn probe_in_background(reader: Arc<StripeReader>, config: &Config, credits: &CreditSettings) {
    let paths = credit_reads_of(config, credits);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no async runtime: what the Stripe secret key may read is not asked (tollgate check asks)");
        return;
    };
    runtime.spawn(async move {
        let access = reader.probe(&paths).await;
        if !access.refused.is_empty() {
            tracing::error!(lacking = ?access.refused,
                "the Stripe secret key cannot read what [stripe.credits] needs: payments that need it are \
                 answered 500 (Stripe delivers them again for 3 days) until the key can; see docs/stripe.md");
        }
        if let Some(why) = access.unreachable {
            tracing::warn!(error = %why, "Stripe could not be asked what the secret key may read; payments are read when they come");
        }
    });
}

impl WebhookHandler {
    /// A verified event that may be a payment topping up a prepaid balance: `Some` with what
    /// it did, `None` when it is not one (it goes on to the plan transitions).
    pub(super) async fn payment_event(
        &self,
        config: &Config,
        credits: &CreditSettings,
        event: &str,
        kind: &str,
        payload: &str,
    ) -> Option<WebhookOutcome> {
        let session = match kind {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => true,
            "invoice.paid" => false,
            "charge.refunded" => return self.refund(config, credits, event, payload).await,
            "credit_note.created" | "credit_note.voided" => {
                return self.credit_note(config, credits, event, kind, payload).await
            }
            "charge.dispute.funds_withdrawn" | "charge.dispute.closed" | "charge.dispute.funds_reinstated" => {
                return self.dispute(config, credits, event, kind, payload).await
            }
            "invoice.payment_failed" | "invoice.payment_action_required" => {
                return self.recharge_failed(config, event, kind, payload).await
            }
            _ => return None,
        };
        let body: Value = serde_json::from_str(payload).ok()?;
        if body["account"].is_string() {
            // A connected account's payment (Stripe Connect): not this account's credits, and
            // its objects are read with that account's header, which tollgate does not send.
            tracing::info!(%event, %kind, "a payment of a connected account: no credits granted");
            return None;
        }
        let outcome = self.payment(config, credits, event, kind, session, &body).await;
        // A recharge's invoice, paid: its recharge is closed (granted now or before, or nothing
        // to grant: a zero invoice), unless the grant is still to come (500, delivered again).
        if !session
            && !matches!(
                outcome,
                Some(WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_) | WebhookOutcome::ApiRefused { .. })
            )
        {
            let granted = matches!(outcome, Some(WebhookOutcome::Credited { .. } | WebhookOutcome::Duplicate));
            let not_credited = match &outcome {
                Some(
                    o @ (WebhookOutcome::Ignored
                    | WebhookOutcome::NotCredited { .. }
                    | WebhookOutcome::PaymentUnknown { .. }),
                ) => match self.recharge_not_credited(config, &body, o).await {
                    Ok(recharge) => recharge,
                    Err(failed) => return Some(failed),
                },
                _ => false,
            };
            // Paid and credited (or nothing to credit: a zero invoice): closed as paid. Paid
            // and not credited: turned off above, never closed as paid.
            if !not_credited {
                if let Err(failed) = self.recharge_paid(config, &body, granted).await {
                    return Some(failed);
                }
            }
        }
        if session
            || matches!(
                outcome,
                Some(WebhookOutcome::StoreFailed(_) | WebhookOutcome::ApiFailed(_) | WebhookOutcome::ApiRefused { .. })
            )
        {
            return outcome;
        }
        // Proration credits on the invoice take back what they credit, after its own grant (a
        // credit waiting for its grant never holds the invoice's back).
        match (self.prorations(config, credits, event, &body).await, outcome) {
            (Err(failed), _) => Some(failed),
            (
                Ok(Some((tenant, meter, units))),
                None | Some(WebhookOutcome::Ignored | WebhookOutcome::NotCredited { .. } | WebhookOutcome::Duplicate),
            ) => Some(WebhookOutcome::Refunded { tenant, meter, units }),
            (Ok(_), outcome) => outcome,
        }
    }

    /// The proration credits of an invoice (negative proration lines on a price of
    /// `[stripe.credits.prices]`, a downgrade's or a cancel's credit for unused time), net of
    /// the proration charges on a credit price of the same subscription item (a quantity
    /// raised, a price switched: the charge for the rest of the period): each takes back from
    /// the grant of the invoice it credits what its net money bought there
    /// (`bought × credit / paid`), once per credit line, as a take apart from the payment's
    /// refunds. `Ok(Some(..))`: units taken (the last tenant and meter, the units in all);
    /// `Err`: the answer (a read or the store failed, or the grant of a credited invoice a day
    /// old or less has not landed yet: 500, delivered again).
    async fn prorations(
        &self,
        config: &Config,
        credits: &CreditSettings,
        event: &str,
        body: &Value,
    ) -> Result<Option<(TenantId, MeterId, u64)>, WebhookOutcome> {
        let o = &body["data"]["object"];
        if credits.refunds == RefundPolicy::Ignore || credits.prices.is_empty() {
            return Ok(None);
        }
        let Some(quota) = self.quota.as_ref() else { return Ok(None) };
        let (Some(object), Some(customer)) = (id_of(&o["id"]), id_of(&o["customer"])) else { return Ok(None) };
        // Only an invoice whose embedded lines show a proration credit, or whose lines are not
        // all embedded, is read further.
        let is_credit = |p: &Proration| p.money < 0 && p.invoice.is_some();
        let may = o["lines"]["has_more"] == true
            || o["lines"]["data"]
                .as_array()
                .is_some_and(|lines| lines.iter().any(|l| line_of(l).proration.as_ref().is_some_and(is_credit)));
        if !may {
            return Ok(None);
        }
        let lines = match self.lines(o, object, false).await {
            Ok(lines) => lines,
            Err(LinesError::NoKey) => return Ok(None),
            Err(LinesError::TooMany) => {
                tracing::error!(%event, invoice = %object,
                    "an invoice of more than {} line items: its proration credits are not taken back; revoke by hand",
                    MAX_PAGES * 100);
                return Ok(None);
            }
            Err(LinesError::Read(e)) => return Err(self.unreadable(event, "the invoice's line items (prorations)", e)),
        };
        let prorated: Vec<(&Line, &Proration)> =
            lines.iter().filter_map(|l| l.proration.as_ref().map(|p| (l, p))).collect();
        if !prorated.iter().any(|(_, p)| is_credit(p)) {
            return Ok(None);
        }
        let unmatched: Vec<&str> = prorated
            .iter()
            .flat_map(|(l, _)| l.skipped.iter())
            .filter(|k| !credits.prices.contains_key(*k))
            .map(String::as_str)
            .collect();
        let ids = self
            .lookup_ids(credits, &unmatched)
            .await
            .map_err(|e| self.unreadable(event, "the prices of [stripe.credits.prices]'s lookup keys", e))?;
        let on_credit_price = |l: &Line| {
            l.skipped.iter().any(|k| {
                credits.prices.contains_key(k) || ids.get(k).is_some_and(|key| credits.prices.contains_key(key))
            })
        };
        let prorated: Vec<(&Line, &Proration)> = prorated.into_iter().filter(|(l, _)| on_credit_price(l)).collect();
        // Each credit net of what the new quantity or price charges for the rest of the period:
        // first the charges of its own subscription item, then what is left of the charges of
        // its subscription (an item replaced by another, a charge naming no item).
        let mut by_item: HashMap<&str, (u64, Option<&str>)> = HashMap::new();
        let mut by_subscription: HashMap<Option<&str>, u64> = HashMap::new();
        for (_, p) in prorated.iter().filter(|(_, p)| p.money > 0) {
            let money = p.money.unsigned_abs();
            match p.item.as_deref() {
                Some(item) => {
                    let e = by_item.entry(item).or_insert((0, p.subscription.as_deref()));
                    e.0 = e.0.saturating_add(money);
                }
                None => {
                    let e = by_subscription.entry(p.subscription.as_deref()).or_default();
                    *e = e.saturating_add(money);
                }
            }
        }
        let mut net: Vec<(&str, &str, u64)> = Vec::new();
        for (line, p) in prorated.iter().filter(|(_, p)| p.money < 0) {
            let (Some(invoice), Some(id)) = (p.invoice.as_deref(), line.id.as_deref()) else { continue };
            let mut money = p.money.unsigned_abs();
            if let Some((charged, _)) = p.item.as_deref().and_then(|i| by_item.get_mut(i)) {
                let o = (*charged).min(money);
                *charged -= o;
                money -= o;
            }
            net.push((invoice, id, money));
        }
        for (_, (charged, subscription)) in by_item {
            let e = by_subscription.entry(subscription).or_default();
            *e = e.saturating_add(charged);
        }
        for ((_, p), n) in
            prorated.iter().filter(|(l, p)| p.money < 0 && p.invoice.is_some() && l.id.is_some()).zip(&mut net)
        {
            if let Some(charged) = by_subscription.get_mut(&p.subscription.as_deref()) {
                let o = (*charged).min(n.2);
                *charged -= o;
                n.2 -= o;
            }
        }
        // Never the invoice itself: its own lines are granted (or not) by its payment.
        net.retain(|(invoice, _, money)| *money > 0 && *invoice != object);
        if net.is_empty() {
            return Ok(None);
        }
        let now = self.clock.unix_secs();
        let age = now - body["created"].as_i64().unwrap_or(0);
        let tenant = match self.tenant_of(config, customer).await {
            Ok(Some(t)) => Some(t),
            Ok(None) => None,
            Err(e) => return Err(WebhookOutcome::StoreFailed(e.to_string())),
        };
        let grants = match &tenant {
            Some(tenant) => match quota.credit_grants(tenant, None).await {
                Ok((grants, _)) => grants,
                Err(e) => return Err(WebhookOutcome::StoreFailed(e.to_string())),
            },
            None => Vec::new(),
        };
        let mut taken: Option<(TenantId, MeterId, u64)> = None;
        for (invoice, id, money) in net {
            match grants.iter().find(|g| g.id == invoice) {
                Some(g) if g.closed.is_some() => continue,
                Some(g) if g.paid.is_none() => {
                    tracing::error!(%event, grant = %g.id, line = %id, credit = money,
                        "a proration credit of a grant made before its cost was recorded: nothing taken back; \
                         revoke its share by hand (tollgate credits revoke)");
                    continue;
                }
                Some(_) => {}
                // Its grant may still be on its way (its invoice paid a day ago or less, its own
                // event answered 500 meanwhile, as a payment of an unknown customer is):
                // delivered again. An invoice never granted (bought before credits were sold,
                // granted by hand, not paid) is logged.
                None if age <= UNKNOWN_CUSTOMER_GRACE_SECS && self.recently_paid(event, invoice, now).await? => {
                    tracing::warn!(%event, %invoice, line = %id,
                        "a proration credit of an invoice no grant has yet: answered 500 so Stripe delivers it again");
                    return Err(WebhookOutcome::StoreFailed(format!("no grant of {invoice} yet")));
                }
                None => {
                    tracing::error!(%event, %invoice, line = %id, credit = money,
                        "a proration credit on a credit price of an invoice no grant has: nothing taken back; \
                         if its units were granted by hand, revoke their share by hand");
                    continue;
                }
            }
            let Some(tenant) = &tenant else { continue };
            let take =
                CreditRefund::new(invoice, 0, 0, now).of_credit_lines(money).for_tenant(tenant.clone()).taking_once(id);
            match quota.refund_credits(&take).await {
                Ok(RefundOutcome::Taken { tenant, meter, grant, units }) => {
                    self.node.tenant_changed(&tenant);
                    tracing::info!(%event, %tenant, %meter, %grant, units, line = %id, credit = money,
                        "a proration credit took back prepaid credits");
                    let total = taken.as_ref().map_or(0, |t| t.2).saturating_add(units);
                    taken = Some((tenant, meter, total));
                }
                Ok(RefundOutcome::Full) => {
                    tracing::error!(%event, %invoice, line = %id,
                        "a proration credit of a grant holding too many takes: nothing taken back; revoke by hand");
                }
                // Taken before (a redelivery), or the grant has closed meanwhile.
                Ok(_) => {}
                Err(e) => return Err(WebhookOutcome::StoreFailed(e.to_string())),
            }
        }
        Ok(taken)
    }

    /// A voided credit note's take given back ([`credit_note`](Self::credit_note)).
    ///
    /// A void of an invoice whose grant may still come (unpaid, or paid a day ago or less) is
    /// answered 500 until the grant lands, as its note is: dropped, it would leave the note,
    /// delivered after the grant, taking what Stripe gave back. A void of a note that credited
    /// nothing of the invoice's credit lines (the seats of an invoice) is ignored at once, as
    /// the note is.
    async fn credit_note_voided(
        &self,
        credits: &CreditSettings,
        event: &str,
        o: &Value,
        invoice: &str,
        back: CreditRefund,
    ) -> Option<WebhookOutcome> {
        let quota = self.quota.as_ref()?;
        let note = id_of(&o["id"]).unwrap_or_default();
        // As its note: what it credited of the credit lines (none: nothing was taken).
        match self.credit_lines(credits, invoice).await {
            Ok(lines) if note_money(o, &lines, NotePart::Credited) == 0 => return Some(WebhookOutcome::Ignored),
            Ok(_) => {}
            Err(e) => return Some(self.unreadable(event, "the voided credit note's invoice lines", e)),
        }
        match quota.refund_credits(&back).await {
            Ok(RefundOutcome::GivenBack { tenant, meter, grant, units }) => {
                self.node.tenant_changed(&tenant);
                tracing::info!(%event, %note, %tenant, %meter, %grant, units, "a credit note voided: what it took given back");
                Some(WebhookOutcome::Reinstated { tenant, meter, units })
            }
            // Its grant may still come: delivered again until it lands.
            Ok(RefundOutcome::Unknown) => match self.grant_may_come(event, invoice, self.clock.unix_secs()).await {
                Ok(true) => {
                    tracing::warn!(%event, %note, %invoice,
                        "a credit note voided of an invoice no grant has yet: answered 500 so Stripe delivers it again");
                    Some(WebhookOutcome::StoreFailed(format!("no grant of {invoice} yet")))
                }
                Ok(false) => Some(WebhookOutcome::Ignored),
                Err(failed) => Some(failed),
            },
            Ok(RefundOutcome::Full) => Some(WebhookOutcome::StoreFailed("the grant holds too many takes".into())),
            Ok(_) => Some(WebhookOutcome::Duplicate),
            Err(e) => Some(WebhookOutcome::StoreFailed(e.to_string())),
        }
    }

    /// Whether the grant of `invoice` may still come: it is not paid yet (open), or was paid a
    /// day ago or less; `Err`: the answer to a failed read (500).
    async fn grant_may_come(&self, event: &str, invoice: &str, now: i64) -> Result<bool, WebhookOutcome> {
        let Some(reader) = self.reader.as_ref() else { return Ok(false) };
        if !invoice.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Ok(false);
        }
        match reader.get(&format!("v1/invoices/{invoice}")).await {
            Ok(inv) => Ok(inv["status"] == "open"
                || (inv["status"] == "paid"
                    && inv["status_transitions"]["paid_at"]
                        .as_i64()
                        .is_some_and(|at| now - at <= UNKNOWN_CUSTOMER_GRACE_SECS))),
            Err(e) => Err(self.unreadable(event, "the invoice a credit note credits", e)),
        }
    }

    /// Whether `invoice` was paid a day ago or less (read from the API: its
    /// `status_transitions.paid_at`; `false` without a key, or not paid); `Err`: the answer to
    /// a failed read (500).
    async fn recently_paid(&self, event: &str, invoice: &str, now: i64) -> Result<bool, WebhookOutcome> {
        let Some(reader) = self.reader.as_ref() else { return Ok(false) };
        if !invoice.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Ok(false);
        }
        match reader.get(&format!("v1/invoices/{invoice}")).await {
            Ok(inv) => Ok(inv["status"] == "paid"
                && inv["status_transitions"]["paid_at"]
                    .as_i64()
                    .is_some_and(|at| now - at <= UNKNOWN_CUSTOMER_GRACE_SECS)),
            Err(e) => Err(self.unreadable(event, "the invoice a proration credits", e)),
        }
    }

    /// A refund (`charge.refunded`): the units the refunded money bought are taken back from
    /// the grant of its payment, as Stripe holds the payment's refunds now (cumulative, so
    /// redeliveries and refunds out of order take each unit once). With a secret key, refunds
    /// whose metadata says `tollgate_units` take that many, and the credit notes of the
    /// payment's invoice say which lines were refunded; the rest is shared by
    /// `refund_attribution`. A refund before its grant is kept by the store and applied when the
    /// grant lands.
    async fn refund(
        &self,
        config: &Config,
        credits: &CreditSettings,
        event: &str,
        payload: &str,
    ) -> Option<WebhookOutcome> {
        let body: Value = serde_json::from_str(payload).ok()?;
        let o = &body["data"]["object"];
        let intent = id_of(&o["payment_intent"]);
        if credits.refunds == RefundPolicy::Ignore {
            // No units taken back; a recharge's refund still turns recharge off.
            let invoice = id_of(&o["invoice"]);
            let why = crate::store::RechargeFailure::Refunded;
            return self.recharge_reversed_ignoring(config, intent, invoice, why).await.err();
        }
        let (Some(amount), Some(refunded)) = (o["amount"].as_u64(), o["amount_refunded"].as_u64()) else {
            return Some(WebhookOutcome::Rejected("a refunded charge without its amounts".into()));
        };
        if refunded > amount {
            return Some(WebhookOutcome::Rejected("a charge refunded more than its amount".into()));
        }
        let quota = self.quota.as_ref()?;
        let tenant = match id_of(&o["customer"]) {
            Some(customer) => match self.tenant_of(config, customer).await {
                Ok(t) => t,
                Err(e) => return Some(WebhookOutcome::StoreFailed(e.to_string())),
            },
            None => None,
        };
        // The invoice: the charge's (API versions before 2025-03-31), else the grant's id when
        // the grant of this payment was made for an invoice.
        let mut invoice = id_of(&o["invoice"]).map(str::to_owned);
        let mut granted = false;
        if let (Some(tenant), Some(intent)) = (&tenant, intent) {
            match quota.credit_grants(tenant, None).await {
                Ok((grants, _)) => {
                    let of = |g: &&CreditGrant| {
                        g.payment.as_deref() == Some(intent) || invoice.as_deref().is_some_and(|i| g.id == i)
                    };
                    granted = grants.iter().any(|g| of(&g));
                    if invoice.is_none() {
                        invoice = grants.iter().find(|g| of(g) && g.id.starts_with("in_")).map(|g| g.id.clone());
                    }
                }
                Err(e) => return Some(WebhookOutcome::StoreFailed(e.to_string())),
            }
        }
        // No grant names it yet (its grant may land later): the invoice the payment paid, if
        // any, read from its payments, so that its credit notes attribute the refund now and
        // when it is kept for its grant.
        if let (None, Some(intent), Some(reader)) = (&invoice, intent, self.reader.as_ref()) {
            match invoice_of_payment(reader, intent).await {
                Ok(found) => invoice = found,
                Err(e) => return Some(self.unreadable(event, "the invoice a refunded payment paid", e)),
            }
        }
        let Some(payment) = intent.or(invoice.as_deref()).map(str::to_owned) else {
            tracing::info!(%event, "a refund of a charge without a payment intent: no credits to take back");
            return None;
        };
        // No grant of it yet: kept for its grant only if the payment bought credits (read from
        // its invoice or checkout session), so that the account's other refunds are never
        // stored (a customer not linked yet is no reason: its grant may land later).
        if !granted {
            if let Some(reader) = self.reader.as_ref() {
                match self.bought_credits(credits, reader, intent, invoice.as_deref()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(%event, %payment, "a refund of a payment that bought no credits: nothing kept");
                        return Some(WebhookOutcome::Ignored);
                    }
                    Err(e) => return Some(self.unreadable(event, "what the refunded payment bought", e)),
                }
            }
        }
        let now = self.clock.unix_secs();
        let mut refund =
            CreditRefund::new(payment.clone(), refunded, amount, now).attributed(credits.refund_attribution);
        if let Some(invoice) = &invoice {
            refund = refund.of_invoice(invoice.clone());
        }
        if let Some(tenant) = &tenant {
            refund = refund.for_tenant(tenant.clone());
        }
        if self.reader.is_some() {
            match self.refund_details(credits, intent, invoice.as_deref(), refunded).await {
                Ok((plain, of_credits, units)) => {
                    refund.refunded = plain;
                    refund = refund.of_credit_lines(of_credits).naming_units(units);
                }
                Err(e) => return Some(self.unreadable(event, "the payment's refunds or credit notes", e)),
            }
        }
        match quota.refund_credits(&refund).await {
            Ok(RefundOutcome::Taken { tenant, meter, grant, units }) => {
                self.node.tenant_changed(&tenant);
                tracing::info!(%event, %tenant, %meter, %grant, units, refunded, amount,
                    "a refund took back prepaid credits");
                self.recharge_reversed(&tenant, &meter, &grant, crate::store::RechargeFailure::Refunded).await;
                Some(WebhookOutcome::Refunded { tenant, meter, units })
            }
            // That much was taken back already, or the grant has closed.
            Ok(RefundOutcome::Nothing | RefundOutcome::GivenBack { .. }) => Some(WebhookOutcome::Duplicate),
            Ok(RefundOutcome::Unknown) => Some(WebhookOutcome::Ignored),
            Ok(RefundOutcome::Kept) => {
                tracing::info!(%event, %payment, refunded, amount,
                    "a refund of a payment no grant has yet: kept, and applied when its grant lands");
                Some(WebhookOutcome::RefundKept { payment })
            }
            Ok(RefundOutcome::Full) => {
                tracing::error!(%event, %payment,
                    "a refund of a payment no grant has yet, and too many refunds are kept: answered 500, so \
                     Stripe delivers it again");
                Some(WebhookOutcome::StoreFailed("too many refunds kept for grants that have not landed".into()))
            }
            Err(e) => Some(WebhookOutcome::StoreFailed(e.to_string())),
        }
    }

    /// Whether the payment `intent` (of `invoice`, if it paid one) bought credits: its invoice,
    /// else its checkout session, says `tollgate_units` in its metadata or has a line on a
    /// price of `[stripe.credits.prices]`. A payment of neither (made outside Checkout and
    /// Invoicing) never grants credits.
    async fn bought_credits(
        &self,
        credits: &CreditSettings,
        reader: &StripeReader,
        intent: Option<&str>,
        invoice: Option<&str>,
    ) -> Result<bool, ReadError> {
        let safe = |id: &str| id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let (object, session) = match (invoice, intent) {
            (Some(invoice), _) if safe(invoice) => (reader.get(&format!("v1/invoices/{invoice}")).await?, false),
            (None, Some(intent)) if safe(intent) => {
                let page = reader.get(&format!("v1/checkout/sessions?payment_intent={intent}&limit=1")).await?;
                match page["data"].as_array().and_then(|d| d.first()) {
                    Some(session) => (session.clone(), true),
                    None => return Ok(false),
                }
            }
            _ => return Ok(false),
        };
        let o = &object;
        if !named(o, UNITS_KEY, session).is_null() {
            return Ok(true);
        }
        let Some(id) = id_of(&o["id"]) else { return Ok(false) };
        let lines = match self.lines(o, id, session).await {
            Ok(lines) => lines,
            Err(LinesError::Read(e)) => return Err(e),
            Err(e) => return Err(ReadError::permanent(format!("the payment's lines: {e:?}"))),
        };
        let keys: Vec<&str> = lines.iter().flat_map(|l| l.keys.iter().chain(&l.skipped)).map(String::as_str).collect();
        if keys.iter().any(|k| credits.prices.contains_key(*k)) {
            return Ok(true);
        }
        let ids = self.lookup_ids(credits, &keys).await?;
        Ok(keys.iter().any(|k| ids.get(*k).is_some_and(|key| credits.prices.contains_key(key))))
    }

    /// A dispute of a payment that bought credits, applied once per dispute id whatever the
    /// order its events come in: `charge.dispute.funds_withdrawn`, or `charge.dispute.closed`
    /// lost, takes back what the payment bought, as a full refund would (from what the balance
    /// still holds first); `charge.dispute.funds_reinstated`, or `charge.dispute.closed` won,
    /// gives back what the withdrawal took of what the balance held (and, come first, leaves
    /// the withdrawal nothing to take). Only a grant already made is concerned: a dispute of a
    /// payment no grant has is `ignored`, nothing kept.
    async fn dispute(
        &self,
        config: &Config,
        credits: &CreditSettings,
        event: &str,
        kind: &str,
        payload: &str,
    ) -> Option<WebhookOutcome> {
        let body: Value = serde_json::from_str(payload).ok()?;
        let o = &body["data"]["object"];
        let dispute = id_of(&o["id"])?.to_owned();
        let intent = id_of(&o["payment_intent"]).map(str::to_owned);
        let lost = match kind {
            "charge.dispute.funds_withdrawn" => true,
            "charge.dispute.funds_reinstated" => false,
            _ if o["status"] == "lost" => true,
            _ if o["status"] == "won" => false,
            // An inquiry closed, or a dispute closed in review: nothing was withdrawn.
            _ => return Some(WebhookOutcome::Ignored),
        };
        if credits.refunds == RefundPolicy::Ignore {
            // No units taken back; a recharge's disputed payment still turns recharge off.
            if lost {
                let why = crate::store::RechargeFailure::Disputed;
                return self.recharge_reversed_ignoring(config, intent.as_deref(), None, why).await.err();
            }
            return None;
        }
        let Some(amount) = o["amount"].as_u64().filter(|a| *a > 0) else {
            return Some(WebhookOutcome::Rejected("a dispute without a positive amount".into()));
        };
        let Some(intent) = intent else {
            tracing::info!(%event, %dispute, "a dispute of a charge without a payment intent: no credits to take back");
            return Some(WebhookOutcome::Ignored);
        };
        let quota = self.quota.as_ref()?;
        let now = self.clock.unix_secs();
        // The whole payment disputed: everything it bought, as a full refund takes it.
        let refund = if lost {
            CreditRefund::new(intent.clone(), amount, amount, now).taking_once(dispute.clone())
        } else {
            CreditRefund::new(intent.clone(), 0, amount, now).giving_back(dispute.clone())
        };
        match quota.refund_credits(&refund).await {
            Ok(RefundOutcome::Taken { tenant, meter, grant, units }) => {
                self.node.tenant_changed(&tenant);
                tracing::warn!(%event, %dispute, %tenant, %meter, %grant, units, payment = %intent,
                    "a dispute took back the prepaid credits its payment bought ({units} of what the balance held)");
                self.recharge_reversed(&tenant, &meter, &grant, crate::store::RechargeFailure::Disputed).await;
                Some(WebhookOutcome::Refunded { tenant, meter, units })
            }
            Ok(RefundOutcome::GivenBack { tenant, meter, grant, units }) => {
                self.node.tenant_changed(&tenant);
                if units == 0 {
                    // A win before its withdrawal, a withdrawal that found nothing unspent, or
                    // one applied by an earlier version (which kept no record of it).
                    tracing::warn!(%event, %dispute, %tenant, %meter, %grant, payment = %intent,
                        "a dispute won: nothing to give back (the withdrawal took nothing of what the balance \
                         held, has not come yet and now takes nothing, or was applied by an earlier version \
                         that kept no record of it: then grant its units back by hand)");
                } else {
                    tracing::info!(%event, %dispute, %tenant, %meter, %grant, units, payment = %intent,
                        "a dispute won: the prepaid credits its withdrawal took back were given back");
                }
                Some(WebhookOutcome::Reinstated { tenant, meter, units })
            }
            // No grant of the payment: not a credit purchase (or one granted by hand).
            Ok(RefundOutcome::Unknown) => {
                tracing::info!(%event, %dispute, payment = %intent, "a dispute of a payment no grant has: nothing taken");
                Some(WebhookOutcome::Ignored)
            }
            Ok(RefundOutcome::Full) => {
                tracing::error!(%event, %dispute, payment = %intent,
                    "a dispute of a grant that holds too many takes already: answered 500; revoke the grant by hand");
                Some(WebhookOutcome::StoreFailed("the grant holds too many takes".into()))
            }
            // Applied already (the other event of the dispute, a redelivery), or the grant has
            // closed.
            Ok(_) => Some(WebhookOutcome::Duplicate),
            Err(e) => Some(WebhookOutcome::StoreFailed(e.to_string())),
        }
    }

    /// The answer to a read of Stripe's API that must succeed and failed (`what` it read):
    /// 500, so Stripe delivers the event again. A refusal of the key (401, 403, 404) is
    /// [`WebhookOutcome::ApiRefused`], counted apart and logged once a minute per permission
    /// with what the key lacks (a burst of redeliveries logs it once).
    pub(in crate::billing) fn unreadable(&self, event: &str, what: &str, e: ReadError) -> WebhookOutcome {
        match e.refused {
            Some(permission) => {
                let now = self.clock.unix_secs();
                if self.reader.as_ref().is_some_and(|r| r.log_refusal(&permission, now)) {
                    tracing::error!(%event, lacking = %permission, error = %e.why,
                        "{what} could not be read: Stripe refused the key. Answered 500, so Stripe delivers the \
                         event again (for 3 days); give the key what it lacks, then resend the events of the \
                         meantime past those days (docs/stripe.md)");
                } else {
                    tracing::debug!(%event, lacking = %permission, "{what}: Stripe refused the key again");
                }
                WebhookOutcome::ApiRefused { permission }
            }
            None => {
                tracing::error!(%event, error = %e.why,
                    "{what} could not be read from Stripe: answered 500, so Stripe delivers the event again");
                WebhookOutcome::ApiFailed(e.why)
            }
        }
    }

    /// What Stripe holds of a payment's refunds, all cumulative: the money refunded that
    /// nothing attributes, the money refunded of credit lines as the invoice's credit notes
    /// name them, and the units named by refunds' `tollgate_units` metadata.
    async fn refund_details(
        &self,
        credits: &CreditSettings,
        intent: Option<&str>,
        invoice: Option<&str>,
        refunded: u64,
    ) -> Result<(u64, u64, u64), ReadError> {
        let reader = self.reader.as_ref().ok_or_else(|| ReadError::permanent("no secret key"))?;
        let safe = |id: &str| id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let mut plain = refunded;
        let mut units = 0u64;
        if let Some(intent) = intent.filter(|i| safe(i)) {
            let page = reader.get(&format!("v1/refunds?payment_intent={intent}&limit=100")).await?;
            for r in page["data"].as_array().into_iter().flatten() {
                if r["status"] == "failed" || r["status"] == "canceled" {
                    continue;
                }
                let named = r["metadata"][UNITS_KEY].as_str().and_then(|s| s.trim().parse::<u64>().ok());
                if let Some(u) = named {
                    units = units.saturating_add(u);
                    plain = plain.saturating_sub(r["amount"].as_u64().unwrap_or(0));
                }
            }
        }
        let mut of_credits = 0u64;
        if let Some(invoice) = invoice.filter(|i| safe(i)) {
            let notes = reader.get(&format!("v1/credit_notes?invoice={invoice}&limit=100")).await?;
            // Post-payment notes (or parts of mixed ones) refund; pre-payment ones lowered what
            // was paid, and the grant already counts only what was paid.
            let notes: Vec<&Value> = notes["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| n["status"] != "void" && note_share(n, false).0 > 0)
                .collect();
            if !notes.is_empty() {
                let credit_lines = self.credit_lines(credits, invoice).await?;
                for note in notes {
                    // The note's refunds are attributed by its lines, not shared: its refunded
                    // part (the part credited to the customer's balance or out of band is taken
                    // by its `credit_note.created`).
                    plain = plain.saturating_sub(note_refunded(note));
                    of_credits = of_credits.saturating_add(note_money(note, &credit_lines, NotePart::Refunded));
                }
            }
        }
        Ok((plain, of_credits, units))
    }

    /// The ids of `invoice`'s lines on a credit price of `credits` (by id, or by a lookup key
    /// of the map).
    async fn credit_lines(&self, credits: &CreditSettings, invoice: &str) -> Result<Vec<String>, ReadError> {
        let lines = match self.lines(&Value::Null, invoice, false).await {
            Ok(lines) => lines,
            Err(LinesError::Read(e)) => return Err(e),
            Err(e) => return Err(ReadError::permanent(format!("the invoice's lines: {e:?}"))),
        };
        // The lines on no key of the map: their prices' lookup keys, if it has any.
        let unmatched: Vec<&str> = lines
            .iter()
            .filter(|l| !l.keys.iter().any(|k| credits.prices.contains_key(k)))
            .flat_map(|l| l.keys.iter().map(String::as_str))
            .collect();
        let ids = self.lookup_ids(credits, &unmatched).await?;
        Ok(lines
            .iter()
            .filter(|l| {
                l.keys.iter().any(|k| {
                    credits.prices.contains_key(k) || ids.get(k).is_some_and(|key| credits.prices.contains_key(key))
                })
            })
            .filter_map(|l| l.id.clone())
            .collect())
    }

    /// `credit_note.created`: a post-payment credit note's part credited to the customer's
    /// balance or out of band (its post-payment amount less its `refunds`), which no refund
    /// follows, takes back what that money bought of the invoice's credit lines, once per
    /// credit note (its refunded part is `charge.refunded`'s). A note of an invoice whose grant
    /// may still come (unpaid, or paid a day ago or less): 500, delivered again; of one that
    /// bought no credit: `ignored`, nothing kept.
    ///
    /// `credit_note.voided`: the note's balance credit is reversed by Stripe, so what its
    /// `credit_note.created` took of what the balance still held is given back, once (the
    /// take's reversal, as a dispute won gives back; a void before its take leaves the take
    /// nothing to take).
    ///
    /// The note's customer names the tenant whose grant it takes from: a store that finds a
    /// grant by its payment intent's marker (DynamoDB) finds an invoice's grant by its id only
    /// among the grants of a tenant.
    async fn credit_note(
        &self,
        config: &Config,
        credits: &CreditSettings,
        event: &str,
        kind: &str,
        payload: &str,
    ) -> Option<WebhookOutcome> {
        if credits.refunds == RefundPolicy::Ignore {
            return None;
        }
        let body: Value = serde_json::from_str(payload).ok()?;
        let o = &body["data"]["object"];
        let (Some(note), Some(invoice)) = (id_of(&o["id"]), id_of(&o["invoice"])) else {
            return Some(WebhookOutcome::Ignored);
        };
        let voided = kind == "credit_note.voided";
        // A note that credited nothing to the balance or out of band (a pre-payment note, one
        // all refunded) took nothing, and its void gives nothing back.
        if note_credited(o) == 0 || (!voided && o["status"] == "void") {
            return Some(WebhookOutcome::Ignored);
        }
        let tenant = match id_of(&o["customer"]) {
            Some(customer) => match self.tenant_of(config, customer).await {
                Ok(t) => t,
                Err(e) => return Some(WebhookOutcome::StoreFailed(e.to_string())),
            },
            None => None,
        };
        let of_note = |r: CreditRefund| match &tenant {
            Some(t) => r.for_tenant(t.clone()),
            None => r,
        };
        if voided {
            let back = of_note(CreditRefund::new(invoice, 0, 0, self.clock.unix_secs()).of_invoice(invoice));
            return self.credit_note_voided(credits, event, o, invoice, back.giving_back(note)).await;
        }
        let quota = self.quota.as_ref()?;
        let credit_lines = match self.credit_lines(credits, invoice).await {
            Ok(lines) => lines,
            Err(e) => return Some(self.unreadable(event, "the credit note's invoice lines", e)),
        };
        let money = note_money(o, &credit_lines, NotePart::Credited);
        if money == 0 {
            return Some(WebhookOutcome::Ignored);
        }
        let now = self.clock.unix_secs();
        let take =
            of_note(CreditRefund::new(invoice, 0, 0, now).of_invoice(invoice)).of_credit_lines(money).taking_once(note);
        match quota.refund_credits(&take).await {
            Ok(RefundOutcome::Taken { tenant, meter, grant, units }) => {
                self.node.tenant_changed(&tenant);
                tracing::info!(%event, %note, %tenant, %meter, %grant, units, money,
                    "a credit note to the customer's balance took back the prepaid credits it credits");
                self.recharge_reversed(&tenant, &meter, &grant, crate::store::RechargeFailure::Refunded).await;
                Some(WebhookOutcome::Refunded { tenant, meter, units })
            }
            // Its grant may still come (a mixed note comes before its invoice is paid; the
            // invoice's own event may be answered 500 meanwhile): delivered again while the
            // invoice is unpaid or was paid a day ago or less.
            Ok(RefundOutcome::Unknown) => match self.grant_may_come(event, invoice, now).await {
                Ok(true) => {
                    tracing::warn!(%event, %note, %invoice,
                        "a credit note of an invoice no grant has yet: answered 500 so Stripe delivers it again");
                    Some(WebhookOutcome::StoreFailed(format!("no grant of {invoice} yet")))
                }
                Ok(false) => {
                    tracing::info!(%event, %note, %invoice, "a credit note of an invoice no grant has: nothing taken");
                    Some(WebhookOutcome::Ignored)
                }
                Err(failed) => Some(failed),
            },
            Ok(RefundOutcome::Full) => {
                tracing::error!(%event, %note, "a credit note of a grant that holds too many takes already: answered 500");
                Some(WebhookOutcome::StoreFailed("the grant holds too many takes".into()))
            }
            Ok(_) => Some(WebhookOutcome::Duplicate),
            Err(e) => Some(WebhookOutcome::StoreFailed(e.to_string())),
        }
    }

    /// Price id → lookup key, for the price ids of `unmatched` lines (lines on no key of the
    /// map), when the map has lookup keys ([`LookupKeys`]): see [`LookupKeys::ids`].
    async fn lookup_ids(
        &self,
        credits: &CreditSettings,
        unmatched: &[&str],
    ) -> Result<std::collections::HashMap<String, String>, ReadError> {
        self.lookup_keys.ids(self.reader.as_deref(), credits, unmatched, self.clock.unix_secs()).await
    }

    /// The tenant of a Stripe customer: the directory's, else the configuration file's.
    pub(super) async fn tenant_of(
        &self,
        config: &Config,
        customer: &str,
    ) -> Result<Option<TenantId>, crate::store::StoreError> {
        if let Some(record) = self.directory.tenant_by_customer(customer).await? {
            return Ok(Some(record.id));
        }
        Ok(config.tenants().iter().find(|t| t.stripe_customer() == Some(customer)).map(|t| t.id().clone()))
    }

    /// The line items of a paid checkout session or invoice: those the object embeds, and the
    /// rest read from the API.
    async fn lines(&self, o: &Value, id: &str, session: bool) -> Result<Vec<Line>, LinesError> {
        let embedded = if session { &o["line_items"] } else { &o["lines"] };
        if let Some(data) = embedded["data"].as_array() {
            if embedded["has_more"] != true {
                return Ok(data.iter().map(line_of).collect());
            }
        }
        let reader = self.reader.as_ref().ok_or(LinesError::NoKey)?;
        let path = if session {
            format!("v1/checkout/sessions/{id}/line_items?limit=100")
        } else {
            format!("v1/invoices/{id}/lines?limit=100")
        };
        if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(LinesError::Read(ReadError::permanent(format!("`{id}` is not an object id"))));
        }
        let mut lines = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = match &after {
                None => reader.get(&path).await,
                Some(last) => reader.get(&format!("{path}&starting_after={last}")).await,
            }
            .map_err(LinesError::Read)?;
            let data =
                page["data"].as_array().ok_or_else(|| LinesError::Read(ReadError::permanent("a list without data")))?;
            lines.extend(data.iter().map(line_of));
            match (page["has_more"] == true, data.last().and_then(|l| id_of(&l["id"]))) {
                (true, Some(last)) if last.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                    after = Some(last.to_owned());
                }
                _ => return Ok(lines),
            }
        }
        Err(LinesError::TooMany)
    }

    /// The payment intent that paid an invoice (API versions from 2025-03-31 name it only in
    /// the invoice's payments: `GET /v1/invoice_payments?invoice=…`), for refunds and to tell
    /// one payment's shapes apart; `None` when the invoice lists no paid payment intent; an
    /// error when the read failed. (Without a key, the caller refuses the grant first.)
    pub(in crate::billing) async fn invoice_payment(&self, invoice: &str) -> Result<Option<String>, ReadError> {
        let Some(reader) = self.reader.as_ref() else { return Ok(None) };
        if !invoice.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Ok(None);
        }
        let page = reader.get(&format!("v1/invoice_payments?invoice={invoice}&limit=10")).await?;
        Ok(page["data"].as_array().and_then(|payments| {
            payments.iter().find_map(|p| {
                (p["status"] == "paid" && p["payment"]["type"] == "payment_intent")
                    .then(|| id_of(&p["payment"]["payment_intent"]).map(str::to_owned))
                    .flatten()
            })
        }))
    }
}
