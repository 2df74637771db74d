//! The Stripe stand-in's invoices, through the real async-stripe client, answer as Stripe's API
//! reference documents them ("Create an invoice", "Create an invoice item", "Finalize an
//! invoice", "Pay an invoice", "List all invoices", "Idempotent requests"), failures included:
//! what a recharge (issue 55) will call.

use std::time::Duration;

use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::{
    invoice::{
        CreateInvoice, CreateInvoicePendingInvoiceItemsBehavior, FinalizeInvoiceInvoice, ListInvoice, PayInvoice,
    },
    invoice_item::{CreateInvoiceItem, PricingParam},
    Invoice, InvoiceCollectionMethod, InvoiceStatus,
};

use super::common::stripe::{Card, StandIn, SECRET};

async fn stand_in() -> (StandIn, stripe::Client) {
    let stripe = StandIn::start(&[]).await;
    stripe.add_price("price_pack", None, true);
    stripe.set_unit_amount("price_pack", 1000);
    let client =
        stripe::ClientBuilder::new(SECRET).url(stripe.url.as_str()).timeout(Duration::from_secs(5)).build().unwrap();
    (stripe, client)
}

/// A draft invoice of `packs` packs for `customer`, excluding its pending items, finalized:
/// each call under its own idempotency key, derived from `n`.
async fn open_invoice(client: &stripe::Client, customer: &str, packs: u64, n: u32) -> Invoice {
    let key = |step: &str| RequestStrategy::Idempotent(IdempotencyKey::new(format!("recharge-{n}-{step}")).unwrap());
    let create = CreateInvoice::new()
        .customer(customer)
        .collection_method(InvoiceCollectionMethod::ChargeAutomatically)
        .pending_invoice_items_behavior(CreateInvoicePendingInvoiceItemsBehavior::Exclude)
        .auto_advance(false)
        .metadata(
            [("tollgate_recharge".to_owned(), n.to_string())].into_iter().collect::<std::collections::HashMap<_, _>>(),
        );
    let invoice = create.customize().request_strategy(key("invoice")).send(client).await.unwrap();
    let mut pricing = PricingParam::new();
    pricing.price = Some("price_pack".into());
    let id = invoice.id.clone().unwrap();
    CreateInvoiceItem::new()
        .customer(customer)
        .invoice(id.as_str())
        .pricing(pricing)
        .quantity(packs)
        .customize()
        .request_strategy(key("item"))
        .send(client)
        .await
        .unwrap();
    FinalizeInvoiceInvoice::new(id).customize().request_strategy(key("finalize")).send(client).await.unwrap()
}

#[tokio::test]
async fn an_invoice_is_created_finalized_and_paid_once_and_emits_invoice_paid() {
    let (stripe, client) = stand_in().await;
    let invoice = open_invoice(&client, "cus_1", 3, 1).await;
    assert_eq!(invoice.status, Some(InvoiceStatus::Open));
    assert_eq!(invoice.amount_due, 3000);
    // The same calls again (a retry after a lost answer): answered as the first, nothing new.
    let again = open_invoice(&client, "cus_1", 3, 1).await;
    assert_eq!(again.id, invoice.id);
    assert_eq!(stripe.invoices_created().len(), 1);
    let id = invoice.id.clone().unwrap();
    let pay = |key: &str| {
        PayInvoice::new(id.clone())
            .customize()
            .request_strategy(RequestStrategy::Idempotent(IdempotencyKey::new(key).unwrap()))
            .send(&client)
    };
    let paid = pay("recharge-1-pay").await.unwrap();
    assert_eq!((paid.status, paid.amount_paid), (Some(InvoiceStatus::Paid), 3000));
    assert!(paid.status_transitions.paid_at.is_some());
    assert_eq!(pay("recharge-1-pay").await.unwrap().id, paid.id, "a retried pay charges once");
    let err = pay("another-key").await.unwrap_err().to_string();
    assert!(err.contains("already paid"), "{err}");
    let events = stripe.take_emitted();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["invoice.finalized", "invoice.paid", "invoice.payment_succeeded"], "one payment");
    assert_eq!(events[1]["data"]["object"]["metadata"]["tollgate_recharge"], "1");
    // The same key with other parameters: Stripe's idempotency_error.
    let other = CreateInvoice::new()
        .customer("cus_2")
        .customize()
        .request_strategy(RequestStrategy::Idempotent(IdempotencyKey::new("recharge-1-invoice").unwrap()))
        .send(&client)
        .await
        .unwrap_err()
        .to_string();
    assert!(other.contains("idempotent"), "{other}");
    // Listed by customer, its payment and lines readable as the grant path reads them.
    let listed = ListInvoice::new().customer("cus_1").send(&client).await.unwrap();
    assert_eq!(listed.data.len(), 1);
}

#[tokio::test]
async fn a_declined_card_and_a_customer_without_a_payment_method_fail_as_stripe_answers() {
    let (stripe, client) = stand_in().await;
    stripe.set_card("cus_d", Card::Declined);
    let invoice = open_invoice(&client, "cus_d", 1, 2).await;
    let err = PayInvoice::new(invoice.id.clone().unwrap()).send(&client).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("card_declined"), "{text}");
    let events = stripe.take_emitted();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["invoice.finalized", "invoice.payment_failed"]);
    assert_eq!(events[1]["data"]["object"]["status"], "open", "still open, to be paid again");
    stripe.set_card("cus_n", Card::Missing);
    let invoice = open_invoice(&client, "cus_n", 1, 3).await;
    let err = PayInvoice::new(invoice.id.clone().unwrap()).send(&client).await.unwrap_err();
    assert!(format!("{err:?}").contains("no attached payment source or default payment method"), "{err:?}");
    let kinds: Vec<String> = stripe.take_emitted().iter().map(|e| e["type"].to_string()).collect();
    assert_eq!(kinds, ["\"invoice.finalized\""], "no attempt was made");
    // A card that needs 3-D Secure: the customer must act; the invoice stays open.
    stripe.set_card("cus_3ds", Card::RequiresAction);
    let invoice = open_invoice(&client, "cus_3ds", 1, 6).await;
    let err = PayInvoice::new(invoice.id.clone().unwrap()).send(&client).await.unwrap_err();
    assert!(format!("{err:?}").contains("invoice_payment_intent_requires_action"), "{err:?}");
    let kinds: Vec<String> = stripe.take_emitted().iter().map(|e| e["type"].to_string()).collect();
    assert_eq!(kinds, ["\"invoice.finalized\"", "\"invoice.payment_action_required\""]);
    // An item on an invoice already finalized, or of a price Stripe has not: refused.
    let mut pricing = PricingParam::new();
    pricing.price = Some("price_none".into());
    let err = CreateInvoiceItem::new().customer("cus_n").pricing(pricing).send(&client).await.unwrap_err();
    assert!(format!("{err:?}").contains("No such price"), "{err:?}");
}

#[tokio::test]
async fn a_credit_balance_pays_at_finalization_and_a_lost_answer_is_replayed() {
    let (stripe, client) = stand_in().await;
    // A credit balance covering the invoice: paid when finalized, without a payment.
    stripe.set_credit_balance("cus_b", 5000);
    let invoice = open_invoice(&client, "cus_b", 2, 4).await;
    assert_eq!((invoice.status, invoice.amount_due, invoice.amount_paid), (Some(InvoiceStatus::Paid), 0, 0));
    let err = PayInvoice::new(invoice.id.clone().unwrap()).send(&client).await.unwrap_err();
    assert!(format!("{err:?}").contains("already paid"), "{err:?}");
    // A pay whose answer is lost (executed, the connection closed): the retry under its key
    // gets the first answer, and the customer was charged once.
    let invoice = open_invoice(&client, "cus_c", 1, 5).await;
    stripe.take_emitted();
    stripe.fail_next_invoice_writes(&[super::common::stripe::Fault::TakeAndHang]);
    let pay = || {
        PayInvoice::new(invoice.id.clone().unwrap())
            .customize()
            .request_strategy(RequestStrategy::Idempotent(IdempotencyKey::new("recharge-5-pay").unwrap()))
            .send(&client)
    };
    assert!(pay().await.is_err(), "the answer was lost");
    let paid = pay().await.unwrap();
    assert_eq!(paid.status, Some(InvoiceStatus::Paid));
    let paid_events = stripe.take_emitted().iter().filter(|e| e["type"] == "invoice.paid").count();
    assert_eq!(paid_events, 1, "charged once");
}

#[tokio::test]
async fn an_item_without_its_invoice_waits_for_an_invoice_that_includes_pending_items() {
    let (_stripe, client) = stand_in().await;
    let mut pricing = PricingParam::new();
    pricing.price = Some("price_pack".into());
    CreateInvoiceItem::new().customer("cus_p").pricing(pricing).quantity(2u64).send(&client).await.unwrap();
    // Excluded (the default, and what a recharge asks): the invoice holds only its own items.
    let invoice = open_invoice(&client, "cus_p", 1, 7).await;
    assert_eq!(invoice.amount_due, 1000, "the pending item stayed out");
    let included = CreateInvoice::new()
        .customer("cus_p")
        .pending_invoice_items_behavior(CreateInvoicePendingInvoiceItemsBehavior::Include)
        .send(&client)
        .await
        .unwrap();
    assert_eq!(included.amount_due, 2000, "the pending item, on the next invoice that includes it");
}
