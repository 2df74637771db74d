//! A paid checkout session or invoice, granted once per payment: read by its event's shape
//! (`paid_session`, `paid_invoice`), then through the stages both shapes share (the units
//! bought, the balance's meter, a manual capture's, the payer, a grant not made yet, the
//! payment intent for refunds, the grant).
//!
//! Each stage answers `Err(stop)` to end the delivery's handling there: `stop` is the
//! outcome (`None`: not a payment of credits, on to the plans).

use serde_json::Value;

use super::{manual_capture, not_captured, pre_payment_credits, LinesError, MAX_PAGES, METER_KEY, UNITS_KEY};
use crate::{
    base::MAX_BALANCE,
    billing::{
        reader::id_of,
        webhook::{WebhookHandler, WebhookOutcome},
    },
    config::{Config, CreditSettings, MeterId, TenantId},
    store::{CreditGrant, GrantOutcome, QuotaStore},
};

/// How a stage ends the handling of a delivery: the outcome (`None`: on to the plans).
type Stop = Option<WebhookOutcome>;

/// A paid checkout session or invoice, as its event's shape says.
struct Paid<'o> {
    o: &'o Value,
    /// A checkout session (else an invoice).
    session: bool,
    /// A session whose payment may be only authorized (manual capture).
    manual: bool,
    /// The object's id.
    object: &'o str,
    /// The grant's id: the payment's (the invoice's when there is one).
    grant_id: &'o str,
    /// What pre-payment credit notes credited of an invoice (it asks that much less).
    credited_before: i64,
}

impl<'o> Paid<'o> {
    /// The object's own metadata `key`, else, on a period's invoice, its subscription's
    /// ([`named`](super::named)).
    fn metadata(&self, key: &str) -> &'o Value {
        super::named(self.o, key, self.session)
    }
}

/// What the grant records.
struct Purchase<'o> {
    tenant: TenantId,
    meter: MeterId,
    grant_id: &'o str,
    units: u64,
    /// What was paid for the units (the smallest unit of the currency), if known.
    paid: Option<u64>,
    /// The payment intent, for refunds.
    payment: Option<String>,
}

/// The log line of a payment not paid yet (a delayed payment method:
/// `checkout.session.async_payment_succeeded` follows).
fn not_paid_yet(event: &str, kind: &str) -> Stop {
    tracing::info!(%event, %kind, "Stripe payment not paid yet: nothing granted");
    None
}

/// A checkout session (`checkout.session.completed`, `.async_payment_succeeded`), paid, for
/// money.
fn paid_session<'o>(event: &str, kind: &str, o: &'o Value) -> Result<Paid<'o>, Stop> {
    // A payment that may be only authorized (manual capture for some payment method): no
    // checkout event follows its capture, so it is credited only once its payment intent
    // says it succeeded (`captured`), and counted when it was not paid.
    let manual = manual_capture(o);
    if manual && o["payment_status"] != "paid" {
        return Err(Some(not_captured(event, kind, o)));
    }
    // Paid, and for money: a free trial's is paid too.
    if !(o["payment_status"] == "paid" && o["amount_total"].as_i64().is_some_and(|a| a > 0)) {
        return Err(not_paid_yet(event, kind));
    }
    let object = id_of(&o["id"]).ok_or(None)?;
    // The invoice's id when there is one, so that the session and the invoice of one payment
    // make one grant.
    let Some(grant_id) = id_of(&o["invoice"]).or_else(|| id_of(&o["payment_intent"])) else {
        tracing::warn!(%event, %kind, session = %object,
            "paid checkout session without an invoice or a payment intent: no payment to grant credits for");
        return Err(None);
    };
    Ok(Paid { o, session: true, manual, object, grant_id, credited_before: 0 })
}

/// An invoice (`invoice.paid`), paid, for money.
fn paid_invoice<'o>(event: &str, kind: &str, o: &'o Value) -> Result<Paid<'o>, Stop> {
    // Pre-payment credit notes lower what an invoice asks to be paid.
    let credited_before = o["pre_payment_credit_notes_amount"].as_i64().unwrap_or(0).max(0);
    // `total`, not `amount_paid`: an invoice paid from the customer's credit balance has
    // nothing left to pay, and was paid for all the same; less its pre-payment credit notes,
    // which paid nothing. A fully discounted invoice is paid for nothing.
    if !(o["status"] == "paid" && o["total"].as_i64().is_some_and(|a| a.saturating_sub(credited_before) > 0)) {
        return Err(not_paid_yet(event, kind));
    }
    let object = id_of(&o["id"]).ok_or(None)?;
    Ok(Paid { o, session: false, manual: false, object, grant_id: object, credited_before })
}

/// The units `tollgate_units` names (`None`: it names none), scaled down by what pre-payment
/// credit notes took back of an invoice, with what was paid for them.
fn named_units(event: &str, kind: &str, paid: &Paid<'_>) -> Result<Option<(u64, Option<u64>)>, Stop> {
    let o = paid.o;
    let object = paid.object;
    let units = match paid.metadata(UNITS_KEY) {
        Value::Null => return Ok(None),
        v => match v.as_str().and_then(|s| s.trim().parse::<u64>().ok()).filter(|u| (1..=MAX_BALANCE).contains(u)) {
            Some(u) => u,
            None => {
                // Signed by Stripe: a 400 would be retried for days. Logged for a person.
                tracing::error!(%event, %kind, object = %object, value = %v,
                    "metadata `{UNITS_KEY}` is not a number of units from 1 to 2^50: nothing granted; grant by hand \
                     (tollgate credits grant)");
                return Err(Some(WebhookOutcome::Ignored));
            }
        },
    };
    // What the payment paid for the credits: its total.
    let whole = o["amount_total"].as_u64().or_else(|| o["amount_paid"].as_u64());
    if paid.credited_before == 0 {
        return Ok(Some((units, whole)));
    }
    // Units named for the whole invoice: a pre-payment credit note took its share back.
    let total = o["total"].as_i64().unwrap_or(0).max(1);
    let left = total.saturating_sub(paid.credited_before).max(0);
    let scaled = (u128::from(units) * left as u128 / total as u128) as u64;
    if scaled == 0 {
        return Err(Some(WebhookOutcome::Ignored));
    }
    Ok(Some((scaled, whole)))
}

/// The balance's meter: `tollgate_meter`, else `[stripe.credits] meter`; some plan must hold a
/// prepaid balance on it.
fn prepaid_meter(config: &Config, credits: &CreditSettings, event: &str, paid: &Paid<'_>) -> Result<MeterId, Stop> {
    let meter = match paid.metadata(METER_KEY).as_str() {
        Some(m) => MeterId::from(m),
        None => credits.meter.clone(),
    };
    let prepaid = config
        .plans()
        .values()
        .any(|p| p.quotas().get(&meter).is_some_and(|q| q.period() == crate::config::Period::Prepaid));
    if !prepaid {
        tracing::error!(%event, object = %paid.object, %meter,
            "metadata `{METER_KEY}` names a meter no plan has a prepaid balance on: nothing granted");
        return Err(Some(WebhookOutcome::Ignored));
    }
    Ok(meter)
}

impl WebhookHandler {
    /// A verified checkout session (`session`) or invoice event: the grant it makes, if any (see
    /// [`payment_event`](Self::payment_event)).
    pub(super) async fn payment(
        &self,
        config: &Config,
        credits: &CreditSettings,
        event: &str,
        kind: &str,
        session: bool,
        body: &Value,
    ) -> Option<WebhookOutcome> {
        match self.pay(config, credits, event, kind, session, body).await {
            Ok(outcome) | Err(outcome) => outcome,
        }
    }

    /// [`payment`](Self::payment), stage by stage.
    async fn pay(
        &self,
        config: &Config,
        credits: &CreditSettings,
        event: &str,
        kind: &str,
        session: bool,
        body: &Value,
    ) -> Result<Option<WebhookOutcome>, Stop> {
        let o = &body["data"]["object"];
        let paid = if session { paid_session(event, kind, o)? } else { paid_invoice(event, kind, o)? };
        let (units, cost) = match named_units(event, kind, &paid)? {
            Some(named) => named,
            None if credits.prices.is_empty() => return Err(None),
            None => self.line_units(credits, event, kind, &paid).await?,
        };
        let meter = prepaid_meter(config, credits, event, &paid)?;
        if paid.manual {
            self.captured(event, kind, o).await?;
        }
        let tenant = self.payer(config, event, body, &paid, units).await?;
        let quota = self.unseen_grant(event, &tenant, paid.grant_id).await?;
        let payment = self.payment_of(event, kind, &paid, units).await?;
        let purchase = Purchase { tenant, meter, grant_id: paid.grant_id, units, paid: cost, payment };
        Ok(self.grant(quota.as_ref(), credits, event, kind, body, purchase).await)
    }

    /// The units the payment's lines on credit prices buy (`[stripe.credits.prices]`), with
    /// what was paid for them: an invoice's lines less what its pre-payment credit notes
    /// credited.
    async fn line_units(
        &self,
        credits: &CreditSettings,
        event: &str,
        kind: &str,
        paid: &Paid<'_>,
    ) -> Result<(u64, Option<u64>), Stop> {
        let object = paid.object;
        let mut lines = match self.lines(paid.o, object, paid.session).await {
            Ok(lines) => lines,
            Err(LinesError::NoKey) => {
                // Not retried: a delivery cannot succeed until a key is set.
                tracing::error!(%event, %kind, object = %object,
                    "a paid payment whose line items need reading, and no Stripe secret key: no credits granted (set \
                     STRIPE_SECRET_KEY, or tollgate_units metadata); it goes on to the plans");
                return Err(None);
            }
            Err(LinesError::TooMany) => {
                tracing::error!(%event, object = %object,
                    "a payment of more than {} line items: no credits granted; grant by hand", MAX_PAGES * 100);
                return Err(Some(WebhookOutcome::Ignored));
            }
            // Never taken for "no credits": a paid top-up is answered 500 until its lines can
            // be read (a wrong `api_base` or key is fixed, then the event comes again).
            Err(LinesError::Read(e)) => return Err(Some(self.unreadable(event, "the payment's line items", e))),
        };
        if paid.credited_before > 0 {
            self.credit_noted(event, object, &mut lines, paid.credited_before).await?;
        }
        // Lines that name no configured key but a price id: their lookup keys, if the map has
        // any, come from the API.
        let unmatched: Vec<&str> = lines
            .iter()
            .map(|l| if l.keys.is_empty() { &l.skipped } else { &l.keys })
            .filter(|keys| !keys.iter().any(|k| credits.prices.contains_key(k)))
            .flatten()
            .map(String::as_str)
            .collect();
        let ids = match self.lookup_ids(credits, &unmatched).await {
            Ok(ids) => ids,
            // A paid line is never taken for one on no credit price unread: answered 500
            // (Stripe delivers it again), whatever the cause, logged for a person.
            Err(e) => {
                return Err(Some(self.unreadable(event, "the prices of [stripe.credits.prices]'s lookup keys", e)))
            }
        };
        let credit = |keys: &[String]| {
            keys.iter()
                .find_map(|k| credits.prices.get(k).or_else(|| ids.get(k).and_then(|key| credits.prices.get(key))))
        };
        let total =
            lines.iter().fold(0u128, |total, line| total + line.units(credit(&line.keys).copied().unwrap_or(0)));
        let cost = lines
            .iter()
            .filter(|l| credit(&l.keys).is_some_and(|per| *per > 0) && l.quantity > 0)
            .fold(0u64, |cost, l| cost.saturating_add(l.paid()));
        let skipped = lines.iter().filter(|l| credit(&l.skipped).is_some()).count();
        match u64::try_from(total) {
            Ok(0) if skipped > 0 => {
                tracing::error!(%event, object = %object, lines = skipped,
                    "a payment whose only lines on credit prices charge nothing or prorate: no credits granted; grant \
                     by hand if they were paid for (tollgate credits grant)");
                Err(None)
            }
            // No price of `[stripe.credits.prices]`: not a credit purchase, or one on a price
            // the map lacks. Counted and logged, never silent.
            Ok(0) => {
                let mut prices: Vec<String> = lines.iter().flat_map(|l| l.keys.iter().cloned()).collect();
                prices.sort();
                prices.dedup();
                prices.truncate(20);
                tracing::info!(%event, %kind, object = %object, ?prices,
                    "a paid payment on no price of [stripe.credits.prices]: no credits granted");
                Err(Some(WebhookOutcome::NotCredited { prices }))
            }
            Ok(u) if u <= MAX_BALANCE => Ok((u, Some(cost))),
            _ => {
                tracing::error!(%event, object = %object, units = %total,
                    "a payment for more units than a balance holds (2^50): nothing granted");
                Err(Some(WebhookOutcome::Ignored))
            }
        }
    }

    /// Marks on `lines` what the invoice's pre-payment credit notes credited of each (a line
    /// credited buys that much less); every credited unit of money must be on a line read.
    async fn credit_noted(
        &self,
        event: &str,
        object: &str,
        lines: &mut [super::Line],
        credited_before: i64,
    ) -> Result<(), Stop> {
        let Some(reader) = self.reader.as_ref() else {
            tracing::error!(%event, object = %object,
                "an invoice with pre-payment credit notes, and no Stripe secret key to read which lines they credit: \
                 no credits granted; grant by hand (tollgate credits grant)");
            return Err(Some(WebhookOutcome::Ignored));
        };
        let credited = match pre_payment_credits(reader, object).await {
            Ok(credited) => credited,
            Err(e) => return Err(Some(self.unreadable(event, "the invoice's credit notes", e))),
        };
        let mut attributed = 0u64;
        for line in lines.iter_mut() {
            if let Some(c) = line.id.as_ref().and_then(|id| credited.get(id)) {
                line.credited = *c;
                attributed = attributed.saturating_add(*c);
            }
        }
        // Credit on no line read here (a custom line of the note, a line past those listed):
        // which units it took back cannot be told.
        if i64::try_from(attributed).unwrap_or(i64::MAX) < credited_before {
            tracing::error!(%event, object = %object, credited = credited_before, attributed,
                "an invoice whose pre-payment credit notes credit lines that cannot be told apart: no credits \
                 granted; grant by hand (tollgate credits grant)");
            return Err(Some(WebhookOutcome::Ignored));
        }
        Ok(())
    }

    /// A session with manual capture is credited once its payment intent says it succeeded
    /// (captured), not while it is only authorized.
    async fn captured(&self, event: &str, kind: &str, o: &Value) -> Result<(), Stop> {
        if self.intent_succeeded(event, o).await.map_err(Some)? {
            Ok(())
        } else {
            Err(Some(not_captured(event, kind, o)))
        }
    }

    /// Whether the payment intent of checkout session `o` has succeeded (captured), read from
    /// Stripe: `false` without a key or a payment intent; the answer to give when the read
    /// failed.
    pub(in crate::billing) async fn intent_succeeded(&self, event: &str, o: &Value) -> Result<bool, WebhookOutcome> {
        let intent = id_of(&o["payment_intent"]).filter(|i| i.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        match (self.reader.as_ref(), intent) {
            (Some(reader), Some(intent)) => match reader.get(&format!("v1/payment_intents/{intent}")).await {
                Ok(pi) => Ok(pi["status"] == "succeeded"),
                Err(e) => Err(self.unreadable(event, "the payment intent of a session with manual capture", e)),
            },
            _ => Ok(false),
        }
    }

    /// The tenant whose customer paid: an unknown customer's payment is delivered again for a
    /// day (the tenant may be given its customer after the checkout), then taken as not ours.
    async fn payer(
        &self,
        config: &Config,
        event: &str,
        body: &Value,
        paid: &Paid<'_>,
        units: u64,
    ) -> Result<TenantId, Stop> {
        let Some(customer) = id_of(&paid.o["customer"]) else {
            tracing::error!(%event, object = %paid.object, units,
                "a payment for prepaid credits without a customer: nothing granted; grant by hand");
            return Err(Some(WebhookOutcome::Ignored));
        };
        match self.tenant_of(config, customer).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => {
                let age = self.clock.unix_secs() - body["created"].as_i64().unwrap_or(0);
                if age > super::UNKNOWN_CUSTOMER_GRACE_SECS {
                    tracing::error!(%event, %customer, units,
                        "a payment for prepaid credits by a customer no tenant has, a day on: nothing granted");
                    return Err(Some(WebhookOutcome::UnknownCustomer));
                }
                tracing::error!(%event, %customer, units,
                    "a payment for prepaid credits by a customer no tenant has yet: answered 500 so Stripe delivers \
                     it again; set the tenant's customer (tollgate tenants set-customer)");
                Err(Some(WebhookOutcome::StoreFailed(format!("no tenant has the customer {customer}"))))
            }
            Err(e) => Err(Some(WebhookOutcome::StoreFailed(e.to_string()))),
        }
    }

    /// The quota store, when `tenant` has no grant `grant_id` yet: one payment, one grant,
    /// whatever meter each shape of it names.
    async fn unseen_grant(
        &self,
        event: &str,
        tenant: &TenantId,
        grant_id: &str,
    ) -> Result<std::sync::Arc<dyn QuotaStore>, Stop> {
        let Some(quota) = &self.quota else {
            tracing::error!(%event, "[stripe.credits] on a webhook handler without a quota store (WebhookHandler::with_quota)");
            return Err(Some(WebhookOutcome::StoreFailed("no quota store to grant credits in".into())));
        };
        match quota.credit_grants(tenant, None).await {
            Ok((grants, _)) if grants.iter().any(|g| g.id == grant_id) => Err(Some(WebhookOutcome::Duplicate)),
            Ok(_) => Ok(quota.clone()),
            Err(e) => Err(Some(WebhookOutcome::StoreFailed(e.to_string()))),
        }
    }

    /// The payment intent, for refunds: the object's, else the invoice's payments' (a
    /// subscription's session names none). Read once the payment is known to be new.
    async fn payment_of(&self, event: &str, kind: &str, paid: &Paid<'_>, units: u64) -> Result<Option<String>, Stop> {
        let invoice = if paid.session { id_of(&paid.o["invoice"]) } else { Some(paid.object) };
        match (id_of(&paid.o["payment_intent"]), invoice) {
            (Some(p), _) => Ok(Some(p.to_owned())),
            (None, Some(invoice)) if self.reader.is_none() => {
                // Without the payment, the session and the invoice of one payment could not be
                // told apart by it: refused, never granted twice.
                tracing::error!(%event, %kind, %invoice, units,
                    "a paid invoice whose payment intent cannot be read (no Stripe secret key): no credits granted; \
                     set STRIPE_SECRET_KEY, or grant by hand (tollgate credits grant)");
                Err(Some(WebhookOutcome::PaymentUnknown { invoice: invoice.to_owned() }))
            }
            (None, Some(invoice)) => match self.invoice_payment(invoice).await {
                Ok(p) => Ok(p),
                // Never granted without it (it could not be refunded): 500 until it can be read.
                Err(e) => Err(Some(self.unreadable(event, "the invoice's payment intent (for refunds)", e))),
            },
            (None, None) => Ok(None),
        }
    }

    /// Grants the purchase, expiring `[stripe.credits] expires_after` from the payment (or
    /// from now, for a delivery that comes late).
    async fn grant(
        &self,
        quota: &dyn QuotaStore,
        credits: &CreditSettings,
        event: &str,
        kind: &str,
        body: &Value,
        p: Purchase<'_>,
    ) -> Option<WebhookOutcome> {
        let Purchase { tenant, meter, grant_id, units, paid, payment } = p;
        let now = self.clock.unix_secs();
        let created = body["created"].as_i64().unwrap_or(now);
        let expires_at = credits
            .expires_after
            .map(|d| created.max(now).saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
        let mut grant = CreditGrant::new(tenant.clone(), meter.clone(), grant_id, units, now).expiring(expires_at);
        if let Some(p) = payment {
            grant = grant.paid_by(p);
        }
        if let Some(paid) = paid {
            grant = grant.costing(paid);
        }
        match quota.grant_credits(&grant).await {
            Ok(GrantOutcome::Granted(balance)) => {
                // At once on this node: its next request asks the store again.
                self.node.tenant_changed(&tenant);
                tracing::info!(%event, %kind, %tenant, %meter, units, grant = %grant_id,
                    granted = balance.granted, used = balance.reserved, "prepaid credits granted by a Stripe payment");
                Some(WebhookOutcome::Credited { tenant, meter, units, grant: grant_id.to_owned() })
            }
            Ok(GrantOutcome::Duplicate(_)) => Some(WebhookOutcome::Duplicate),
            Ok(other) => {
                // Paid for and not granted: a person must act. Stripe retries meanwhile.
                tracing::error!(%event, %tenant, %meter, units, outcome = ?other,
                    "a paid top-up could not be granted (too many open grants, or past the most a balance holds): \
                     answered 500 so Stripe delivers it again; grant by hand (credits grant), let grants expire, or refund the payment");
                // A recharge's: turned off, so that the card is not charged again meanwhile.
                let o = &body["data"]["object"];
                let n = o["metadata"][crate::billing::recharge::RECHARGE_KEY].as_str().and_then(|n| n.parse().ok());
                let ours = o["metadata"][crate::billing::recharge::TENANT_KEY].as_str() == Some(tenant.as_str())
                    && o["metadata"][crate::billing::recharge::METER_KEY].as_str() == Some(meter.as_str());
                if let (Some(n), true) = (n, ours) {
                    let why = format!("the grant was refused: {other:?}");
                    if let Err(failed) = self.recharge_refused(&tenant, &meter, n, &why).await {
                        return Some(failed);
                    }
                }
                Some(WebhookOutcome::StoreFailed(format!("the grant was refused: {other:?}")))
            }
            Err(e) => Some(WebhookOutcome::StoreFailed(e.to_string())),
        }
    }
}
