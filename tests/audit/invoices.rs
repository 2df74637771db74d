//! `b`'s top-ups paid by invoice (a subscription's renewal, a one-off invoice) and the credit
//! notes of those invoices, as Stripe's webhooks carry them: Stripe's example objects with the
//! fields tollgate reads set as Stripe sets them.

use serde_json::{json, Value};

use crate::{
    fleet::{fixtures, intent, Delivery, Fleet, Note, Payment, PACK_CENTS, PACK_UNITS, PAYMENT_AMOUNT},
    ops::Who,
};

/// The most credit notes one invoice gets in a run.
const NOTES_PER_INVOICE: usize = 3;

/// How an invoice buys `b`'s tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bought {
    /// A subscription's renewal (`billing_reason` `subscription_cycle`) on a price the credit
    /// map lacks, its units named by the subscription's `tollgate_units` (Stripe copies the
    /// subscription's metadata into `parent.subscription_details.metadata` of each invoice).
    Renewal,
    /// A subscription's renewal whose line is two packs of `price_pack`.
    RenewalOfPacks,
    /// A one-off invoice (`manual`) of two packs of `price_pack`.
    OneOff,
}

impl Bought {
    pub(crate) fn of(pick: u8) -> Self {
        [Bought::Renewal, Bought::RenewalOfPacks, Bought::OneOff][usize::from(pick % 3)]
    }
}

pub(crate) fn invoice_id(payment: u16) -> String {
    format!("in_audit_{payment}")
}

impl Fleet {
    /// An invoice of `b`'s paid (`invoice.paid` queued `copies` times): `units` tokens by its
    /// subscription's metadata, or two packs by its line.
    pub(crate) fn pay_invoice(&mut self, payment: u16, bought: Bought, units: u64, copies: u8) {
        let id = invoice_id(payment);
        let packs = PAYMENT_AMOUNT / PACK_CENTS;
        let by_line = bought != Bought::Renewal;
        let units = if by_line { packs * PACK_UNITS } else { units };
        let now = self.now();
        let mut inv = fixtures()["invoice"].clone();
        inv["id"] = json!(id);
        inv["customer"] = json!(Who::B.customer());
        inv["status"] = json!("paid");
        for field in ["amount_due", "amount_paid", "total", "subtotal", "subtotal_excluding_tax", "total_excluding_tax"]
        {
            inv[field] = json!(PAYMENT_AMOUNT);
        }
        inv["amount_remaining"] = json!(0);
        inv["amount_overpaid"] = json!(0);
        inv["created"] = json!(now);
        inv["status_transitions"] = json!({ "finalized_at": now, "paid_at": now, "marked_uncollectible_at": null,
            "voided_at": null });
        let subscription = (bought != Bought::OneOff).then(|| format!("sub_audit_{payment}"));
        inv["billing_reason"] = json!(if subscription.is_some() { "subscription_cycle" } else { "manual" });
        inv["parent"] = match &subscription {
            // "The Invoice object": `parent.subscription_details.metadata`, "the subscription's
            // metadata at the time the invoice was finalized".
            Some(sub) => json!({ "type": "subscription_details", "quote_details": null,
                "subscription_details": { "subscription": sub,
                    "metadata": if by_line { json!({}) } else { json!({ "tollgate_units": units.to_string() }) } } }),
            None => json!(null),
        };
        let mut line = fixtures()["line_item"].clone();
        line["id"] = json!(format!("il_{id}_0"));
        line["invoice"] = json!(id);
        line["amount"] = json!(PAYMENT_AMOUNT);
        line["discount_amounts"] = json!([]);
        line["pretax_credit_amounts"] = json!([]);
        line["taxes"] = json!([]);
        let price = if by_line { "price_pack" } else { "price_plan" };
        line["quantity"] = json!(if by_line { packs } else { 1 });
        line["pricing"] = json!({ "type": "price_details", "unit_amount_decimal": if by_line { PACK_CENTS } else { PAYMENT_AMOUNT }.to_string(),
            "price_details": { "price": price, "product": "prod_audit" } });
        line["parent"] = match &subscription {
            Some(sub) => json!({ "type": "subscription_item_details", "invoice_item_details": null,
                "subscription_item_details": { "subscription": sub, "subscription_item": format!("si_audit_{payment}"),
                    "invoice_item": null, "proration": false, "proration_details": { "credited_items": null } } }),
            None => json!({ "type": "invoice_item_details", "subscription_item_details": null,
                "invoice_item_details": { "invoice_item": format!("ii_audit_{payment}"), "subscription": null,
                    "proration": false, "proration_details": { "credited_items": null } } }),
        };
        inv["lines"] = json!({ "object": "list", "data": [line.clone()], "has_more": false,
            "url": format!("/v1/invoices/{id}/lines") });
        self.stripe.add_invoice(inv.clone());
        self.stripe.add_lines(&format!("/v1/invoices/{id}/lines"), vec![line]);
        // Its payment: current API versions name an invoice's payment intent only here.
        let mut paid = fixtures()["invoice_payment"].clone();
        paid["id"] = json!(format!("inpay_audit_{payment}"));
        paid["invoice"] = json!(id);
        paid["status"] = json!("paid");
        paid["amount_paid"] = json!(PAYMENT_AMOUNT);
        paid["currency"] = json!("usd");
        paid["payment"] = json!({ "type": "payment_intent", "payment_intent": intent(payment) });
        self.stripe.add_invoice_payments(&id, vec![paid]);
        let event = self.event(&self.next_event(), "invoice.paid", inv);
        for _ in 0..copies.max(1) {
            self.queue.push(Delivery { payload: event.clone() });
        }
        self.payments.insert(payment, Payment { units, invoice: by_line, ..Payment::default() });
    }

    /// A post-payment credit note of `percent` of `payment`'s invoice to `b`'s balance
    /// (`credit_note.created`), or, with `void`, its oldest note in force voided
    /// (`credit_note.voided`). Only invoices whose line bought packs get notes (a note credits
    /// lines; a renewal by metadata has no credit line to credit).
    pub(crate) fn note(&mut self, payment: u16, percent: u8, void: bool) {
        let invoice = invoice_id(payment);
        let Some(known) = self.payments.get_mut(&payment).filter(|p| p.invoice && p.dispute.is_none()) else {
            return;
        };
        let (kind, changed) = if void {
            let Some(note) = known.notes.iter_mut().find(|n| !n.voided) else { return };
            note.voided = true;
            ("credit_note.voided", note.clone())
        } else {
            let cents = PAYMENT_AMOUNT * u64::from(percent) / 100;
            // Stripe: a post-payment note credits at most what was paid less what was credited
            // or refunded already.
            if known.notes.len() >= NOTES_PER_INVOICE || cents + known.noted() + known.refunded > PAYMENT_AMOUNT {
                return;
            }
            let note = Note { id: format!("cn_audit_{payment}_{}", known.notes.len()), cents, voided: false };
            known.notes.push(note.clone());
            ("credit_note.created", note)
        };
        // Its credit goes to the customer's balance, which Stripe applies to the next invoice
        // finalized (a recharge's); a void takes it back.
        let cents = i64::try_from(changed.cents).unwrap();
        self.stripe.add_credit_balance(Who::B.customer(), if void { -cents } else { cents });
        // "List all credit notes" of the invoice holds them all, voided ones as `void`.
        let notes: Vec<Value> = known.notes.iter().map(|n| note_object(&invoice, n)).collect();
        let object = note_object(&invoice, &changed);
        self.stripe.add_credit_notes(&invoice, notes);
        let payload = self.event(&self.next_event(), kind, object);
        self.queue.push(Delivery { payload });
    }
}

/// Stripe's example credit note of `invoice`: post-payment, all of it credited to the
/// customer's balance (no refund follows it), on the invoice's one line.
fn note_object(invoice: &str, note: &Note) -> Value {
    let mut n = fixtures()["credit_note"].clone();
    n["id"] = json!(note.id);
    n["invoice"] = json!(invoice);
    n["customer"] = json!(Who::B.customer());
    n["status"] = json!(if note.voided { "void" } else { "issued" });
    n["type"] = json!("post_payment");
    n["refunds"] = json!([]);
    n["out_of_band_amount"] = json!(null);
    n["customer_balance_transaction"] = json!(format!("cbtxn_{}", note.id));
    let mut line = n["lines"]["data"][0].clone();
    line["id"] = json!(format!("cnli_{}", note.id));
    line["invoice_line_item"] = json!(format!("il_{invoice}_0"));
    line["amount"] = json!(note.cents);
    line["discount_amounts"] = json!([]);
    line["pretax_credit_amounts"] = json!([]);
    line["taxes"] = json!([]);
    n["amount"] = json!(note.cents);
    n["pre_payment_amount"] = json!(0);
    n["post_payment_amount"] = json!(note.cents);
    n["lines"]["data"] = json!([line]);
    n["lines"]["has_more"] = json!(false);
    n
}
