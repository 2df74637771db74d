//! A Stripe stand-in: a small HTTP/1.1 server on a free loopback port that implements
//! `POST /v1/billing/meter_events` by Stripe's documented rules, for the real async-stripe
//! client to talk to.
//!
//! - The secret key must match (401 otherwise).
//! - `identifier` de-duplication: a repeated identifier is refused with 400
//!   `invalid_request_error`, the message `An event already exists with identifier …` and no
//!   `code`, with `Stripe-Should-Retry: false`, as Stripe answers it (reported by integrators:
//!   langfuse/langfuse#16292; Stripe's reference for `identifier` says only that uniqueness is
//!   enforced "within a rolling period of at least 24 hours"). The stand-in remembers
//!   identifiers for as long as it runs.
//! - `timestamp` no more than 35 days past nor 5 minutes future (400); `value` a whole number
//!   (400); `event_name` of a meter that exists (400).
//! - Dimensions: a meter lists its `dimension_payload_keys` (none unless a test sets them,
//!   `set_dimension_keys`); a payload key beside `stripe_customer_id` and `value` that the meter
//!   does not list is refused (400, `meter_event_dimension_count_too_high` when there are more
//!   such keys than the meter lists, as Stripe's meter error codes name it; otherwise
//!   `parameter_invalid` naming the key), never silently dropped.
//! - `Idempotency-Key`: the same key with the same parameters replays the first answer; with
//!   other parameters it is a 400 `idempotency_error`. Keys are forgotten 24 hours after their
//!   first use (Stripe's idempotency guide: keys "are eligible to be removed from the system
//!   automatically after they're at least 24 hours old"), so a re-send after that meets the
//!   identifier rule instead.
//! - One call in flight per (customer, event name): a concurrent one gets 429 `lock_timeout`.
//! - Injectable faults for the next calls: a status with Stripe's JSON error shape, a status
//!   with a body that is not JSON, a dropped connection, or "take it and never answer" (the
//!   event is recorded, the caller is then killed: a crash between send and mark).
//! - Totals per (customer, event name): a sum meter adds every event; a pre-aggregated meter
//!   keeps the newest event (by timestamp) of each of its windows.
//!
//! - `GET /v1/billing/meters` lists the meters (complete `billing.meter` objects, as in
//!   Stripe's fixtures), paged by `limit` and `starting_after`.
//! - `GET /v1/billing/meters/{id}/event_summaries` (Stripe's API reference, "List billing
//!   meter event summaries"): `customer`, `start_time` and `end_time` are required;
//!   with `value_grouping_window=hour` both times must be on hour boundaries (400 otherwise);
//!   one `billing.meter_event_summary` per hour holding events, paged by `limit` (at most
//!   100) and `starting_after`. With `dimension_group_by_keys` ("List of dimension payload keys
//!   to group by"; stripe-java's `MeterEventSummaryListParams`), one summary per hour and
//!   combination of the events' values under those keys, each with its `dimensions` ("Key-value
//!   pairs of dimension values for event summaries with grouping on dimensions"); a key the
//!   meter does not list is refused 400 (Stripe's behaviour there is not documented: refused,
//!   never kinder). Summaries are "eventually consistent": an event counts in them
//!   only [`VISIBLE_AFTER`] seconds after it was accepted, by the stand-in's clock.
//! - `GET /v2/core/events/{id}` (Stripe's API reference, "Retrieve an event", v2): the full
//!   event of a thin event a test added ([`StandIn::add_v2_event`]); a v2 call without a
//!   `Stripe-Version` header is refused with 400 (v2 endpoints need an explicit version), an
//!   unknown id gets 404 `resource_missing`.
//! - `GET /v1/checkout/sessions/{id}/line_items` and `GET /v1/invoices/{id}/lines` (Stripe's
//!   API reference, "Retrieve a Checkout Session's line items", "Retrieve an invoice's line
//!   items"): the items a test added ([`StandIn::add_lines`]), paged by `limit` and
//!   `starting_after`; an object the test did not add gets 404 `resource_missing`, as an
//!   unknown id does. `GET /v1/invoice_payments?invoice=…` ("List all payments for an
//!   invoice"): the invoice's payments a test added, else an empty list.
//!   `GET /v1/refunds?payment_intent=…` ("List all refunds": "Only return refunds for the
//!   PaymentIntent specified by this ID") and `GET /v1/credit_notes?invoice=…` ("List all credit
//!   notes": "Only return credit notes for the invoice specified by this invoice ID"): those a
//!   test added ([`StandIn::add_refunds`], [`StandIn::add_credit_notes`]), else an empty list;
//!   without its filter, a list is answered with an empty page (tollgate asks for one item of
//!   each list only, to learn what its key may read).
//!   [`StandIn::fail_reads`] makes the next reads of these answer 500 `api_error`.
//! - `GET /v1/prices` (Stripe's API reference, "List all prices": "Returns a list of your
//!   active prices … For the list of inactive prices, set active to false"; `lookup_keys`:
//!   "Only return the price with these lookup_keys, if any exist. You can specify up to 10
//!   lookup_keys"): the prices a test added ([`StandIn::add_price`], complete `price` objects),
//!   active ones unless `active=false`, filtered by every `lookup_keys[]` given; more than 10
//!   is a 400. `GET /v1/prices/{id}` ("Retrieve a price"): the price, or 404
//!   `resource_missing`. Counted by [`StandIn::price_reads`]; [`StandIn::fail_reads`] fails
//!   these too.
//! - Invoices written through the API (Stripe's API reference, "Create an invoice", "Create
//!   an invoice item", "Finalize an invoice", "Pay an invoice", "List all invoices"):
//!   `POST /v1/invoices` makes a draft (`customer` required; `metadata[…]`,
//!   `collection_method` kept; `auto_advance` false unless asked: "Defaults to false");
//!   `POST /v1/invoiceitems` adds a line of a price's `unit_amount` × `quantity` to a draft
//!   invoice of the same customer (an unknown price: 404 "No such price"; a finalized invoice:
//!   400), or, without `invoice`, leaves it pending for the customer's next invoice created
//!   with `pending_invoice_items_behavior=include` ("Defaults to exclude"); `POST /v1/invoices/{id}/void`
//!   ("Void an invoice") voids an open invoice only (`invoice.voided` emitted; a paid or draft
//!   one: 400); `POST /v1/invoices/{id}/finalize` opens a draft (`invoice.finalized` emitted),
//!   applying the customer's credit balance first ([`StandIn::set_credit_balance`],
//!   [`StandIn::add_credit_balance`], "Customer credit balance"; a debit adds to the amount
//!   due): an invoice it covers, or whose amount due is under the minimum charge
//!   (0.50), is paid then and there without a payment (`invoice.paid` emitted), and a later pay
//!   is refused; `POST /v1/invoices/{id}/pay` pays an open invoice with the customer's
//!   default payment method ([`StandIn::set_card`]): it pays (status `paid`,
//!   `status_transitions.paid_at`, a payment intent in its payments, its lines listed,
//!   `invoice.paid` and `invoice.payment_succeeded` emitted), is declined (402 `card_error` `card_declined`: the changelog
//!   of 2017-12-14 "Invoice payment failures now return a card_error"; the invoice stays open,
//!   `invoice.payment_failed` emitted), needs 3-D Secure (402 `card_error`
//!   `invoice_payment_intent_requires_action`, still open, `invoice.payment_action_required`
//!   emitted), or there is none (400 "This customer has no attached
//!   payment source or default payment method.", nothing emitted), or it is a bank debit
//!   ([`Card::BankDebit`]: "Payment method types", "Delayed notification"; ACH Direct Debit
//!   "can take up to 4 business days to receive acknowledgement of success or failure"): 200
//!   with the invoice still `open` and its payment processing, nothing emitted until the test
//!   settles it ([`StandIn::settle_debit`]), a second pay or a void of it meanwhile refused
//!   with 400; paying a paid invoice is a 400. Every one of these writes honours `Idempotency-Key` as the meter events do (the first
//!   answer replayed, failures included; "results are only saved if an API endpoint started
//!   executing", so a refusal of the parameters is not), and takes its own injected faults
//!   ([`StandIn::fail_next_invoice_writes`]: a lost answer of an executed pay, a saved 500). `GET /v1/invoices?customer=…` lists the customer's
//!   invoices newest first (`created[gte]` honoured). Emitted events are taken by
//!   [`StandIn::take_emitted`], for a test to sign and deliver as Stripe would.
//! - Test hooks: [`StandIn::lose`] drops an accepted event from the summaries (Stripe lost
//!   it; its identifier stays taken), [`StandIn::inject`] adds one sent outside tollgate.
//!
//! Errors come in Stripe's JSON shape: `{"error": {"type", "code", "message"}}`.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::BufReader,
    net::{TcpListener, TcpStream},
};

// Declared by each stand-in: the examples include one stand-in file alone.
#[allow(clippy::duplicate_mod)]
#[path = "standin_http.rs"]
mod http;
use http::{read_request, write_answer, Request};

pub const SECRET: &str = "sk_test_standin";

/// A fault for the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This status with Stripe's JSON error body (the call is not executed).
    Status(u16),
    /// This status with a body that is not JSON.
    NotJson(u16),
    /// Close the connection without an answer (not executed).
    Drop,
    /// Execute the call (the event is taken), then never answer.
    TakeAndHang,
    /// Answer as Stripe would: a place in the queue of faults, so that a later one hits a
    /// later write.
    Pass,
    /// Fail while executing, with this status: Stripe saves the answer under the
    /// idempotency key, so every retry with the key gets it again (for 24 hours).
    Saved(u16),
    /// Refuse the request itself with this status, an `invalid_request_error` (a price
    /// archived, a customer deleted: "Errors", error types); not executed.
    Invalid(u16),
}

/// Seconds after its acceptance that an event counts in the event summaries.
pub const VISIBLE_AFTER: i64 = 120;

/// One accepted meter event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub identifier: String,
    pub event_name: String,
    pub customer: String,
    pub value: i64,
    pub timestamp: i64,
}

#[derive(Default)]
struct State {
    /// Meters by event name: `None` for sum, `Some(window)` for pre-aggregated.
    meters: HashMap<String, Option<i64>>,
    /// Each meter's `dimension_payload_keys`.
    dimension_keys: HashMap<String, Vec<String>>,
    /// The dimensions of each accepted event, by identifier.
    dimensions: HashMap<String, BTreeMap<String, String>>,
    /// The parameters of each accepted event, as sent.
    forms: Vec<BTreeMap<String, String>>,
    events: Vec<Accepted>,
    /// When each event was accepted (the stand-in's clock), beside `events`.
    accepted_at: Vec<i64>,
    /// Identifiers of events Stripe lost: left out of the summaries.
    lost: HashSet<String>,
    identifiers: HashSet<String>,
    /// Reads of the event summaries.
    summary_reads: u64,
    /// Full v2 events by id, and the reads of them.
    v2_events: HashMap<String, serde_json::Value>,
    v2_reads: u64,
    /// Lists by path (a payment's line items), reads of them, and reads to fail.
    lists: HashMap<String, Vec<serde_json::Value>>,
    invoice_payments: HashMap<String, Vec<serde_json::Value>>,
    refunds: HashMap<String, Vec<serde_json::Value>>,
    credit_notes: HashMap<String, Vec<serde_json::Value>>,
    list_reads: u64,
    failing_reads: u32,
    /// Objects by path (`/v1/invoices/{id}`, `/v1/checkout/sessions/{id}`), and checkout
    /// sessions to list by payment intent.
    objects: HashMap<String, serde_json::Value>,
    sessions: Vec<serde_json::Value>,
    /// Reads refused by path prefix, with their status (401: a key rolled or revoked; 403: a
    /// restricted key without the permission; 404: a key of another account or mode).
    refused_reads: Vec<(String, u16)>,
    /// Prices (complete `price` objects), and the reads of their list.
    prices: Vec<serde_json::Value>,
    price_reads: u64,
    /// Idempotency key -> (parameters, status, body, first used at).
    idempotency: HashMap<String, (String, u16, String, i64)>,
    /// What each customer's default payment method does when an invoice is paid (none named:
    /// a card that pays).
    cards: HashMap<String, Card>,
    /// Invoices and invoice items created through the API, and the events their payment
    /// emitted (`invoice.paid`, `invoice.payment_failed`), oldest first.
    created: u64,
    created_invoices: Vec<String>,
    /// Faults for the next invoice writes, and customers' credit balances (smallest unit;
    /// Stripe applies them when an invoice is finalized).
    invoice_faults: VecDeque<Fault>,
    credit_balances: HashMap<String, i64>,
    /// Invoice items created without an invoice, pending for their customer's next one:
    /// (customer, the line they become).
    pending_items: Vec<(String, serde_json::Value)>,
    emitted: Vec<serde_json::Value>,
    /// Customers' own currencies (`usd` when unnamed): an invoice created without `currency`
    /// is in its customer's.
    customer_currency: HashMap<String, String>,
    /// Invoices whose bank debit is processing (with its payment intent), and how many `pay`
    /// and `void` calls were made (refused ones included).
    processing: HashMap<String, String>,
    pays: u64,
    voids: u64,
    in_flight: HashSet<(String, String)>,
    faults: VecDeque<Fault>,
    /// A fault applied to every call for a customer (a 429 storm for one of them).
    customer_faults: HashMap<String, u16>,
    now: Option<i64>,
    calls: u64,
    duplicates: u64,
    replays: u64,
    /// Calls per identifier (answered or not).
    sends: HashMap<String, u64>,
    lock_conflicts: u64,
    max_concurrent: usize,
    concurrent: usize,
}

impl State {
    /// Now for the stand-in's rules: the time a test set, else the system clock.
    fn now(&self) -> i64 {
        self.now.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
        })
    }
}

/// A customer's default payment method, as Stripe's test cards behave ("Testing": 4242…
/// succeeds, 4000 0000 0000 0002 is declined with `card_declined`), or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Card {
    Pays,
    Declined,
    /// A card that needs 3-D Secure: off-session payment requires the customer's action.
    RequiresAction,
    /// No default payment method, nor source.
    Missing,
    /// A bank debit (ACH Direct Debit, SEPA Direct Debit, Bacs): a delayed notification
    /// payment method ("Payment method types", "Delayed notification": ACH takes up to 4
    /// business days to confirm success or failure). `pay` answers 200 with the invoice still
    /// `open`, its payment `processing`, nothing emitted; until [`StandIn::settle_debit`]
    /// settles it (`invoice.paid`, or `invoice.payment_failed` with the invoice open), a
    /// second `pay` and a `void` of the invoice are refused with 400 (its payment is under
    /// way).
    BankDebit,
}

/// The stand-in; stops when dropped.
pub struct StandIn {
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Starts on a free loopback port with these meters: (event name, pre-aggregation window).
    pub async fn start(meters: &[(&str, Option<i64>)]) -> Self {
        Self::start_at("127.0.0.1:0", meters).await
    }

    /// Starts on `addr` (a port a test kept free, to bring Stripe back where it was refused).
    pub async fn start_at(addr: &str, meters: &[(&str, Option<i64>)]) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            meters: meters.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect(),
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                tokio::spawn(connection(socket, shared.clone()));
            }
        });
        Self { url, state, task }
    }

    /// Sets the `dimension_payload_keys` of the meter `event_name`.
    pub fn set_dimension_keys(&self, event_name: &str, keys: &[&str]) {
        self.lock().dimension_keys.insert(event_name.to_owned(), keys.iter().map(|k| (*k).to_owned()).collect());
    }

    /// The parameters of each accepted meter event, as sent, in the order accepted.
    pub fn forms(&self) -> Vec<BTreeMap<String, String>> {
        self.lock().forms.clone()
    }

    /// The dimensions of the accepted event `identifier` (its payload keys the meter lists).
    pub fn dimensions_of(&self, identifier: &str) -> BTreeMap<String, String> {
        self.lock().dimensions.get(identifier).cloned().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Now for the timestamp rules (the system clock by default; tests on a fake clock set it).
    pub fn set_now(&self, unix: i64) {
        self.lock().now = Some(unix);
    }

    /// Faults for the next calls, in order.
    pub fn fail_next(&self, faults: &[Fault]) {
        self.lock().faults.extend(faults.iter().copied());
    }

    /// Every call for `customer` gets `status` (with Stripe's JSON error; 0: a dropped
    /// connection) until cleared.
    pub fn fail_customer(&self, customer: &str, status: Option<u16>) {
        let mut s = self.lock();
        match status {
            Some(st) => s.customer_faults.insert(customer.to_owned(), st),
            None => s.customer_faults.remove(customer),
        };
    }

    pub fn events(&self) -> Vec<Accepted> {
        self.lock().events.clone()
    }

    /// Calls received (answered or not).
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Events whose identifier was taken before (refused with 400 "already exists", not counted).
    pub fn duplicates(&self) -> u64 {
        self.lock().duplicates
    }

    /// Forgets the calls per identifier counted so far.
    pub fn reset_sends(&self) {
        self.lock().sends.clear();
    }

    /// The most calls any one identifier got.
    pub fn max_sends_per_identifier(&self) -> u64 {
        self.lock().sends.values().copied().max().unwrap_or(0)
    }

    /// Calls answered from the idempotency layer (the same key and parameters again).
    pub fn replays(&self) -> u64 {
        self.lock().replays
    }

    /// Calls refused because another call for the same (customer, meter) was in flight.
    pub fn lock_conflicts(&self) -> u64 {
        self.lock().lock_conflicts
    }

    /// The most calls executing at once.
    pub fn max_concurrent(&self) -> usize {
        self.lock().max_concurrent
    }

    /// Stripe loses an accepted event: it no longer counts in the summaries (its identifier
    /// stays taken). Returns whether there was one.
    pub fn lose(&self, identifier: &str) -> bool {
        let mut s = self.lock();
        let known = s.events.iter().any(|e| e.identifier == identifier);
        if known {
            s.lost.insert(identifier.to_owned());
        }
        known
    }

    /// An event sent to Stripe outside tollgate (another system, a person).
    pub fn inject(&self, event: Accepted) {
        let mut s = self.lock();
        let now = s.now();
        s.identifiers.insert(event.identifier.clone());
        s.events.push(event);
        s.accepted_at.push(now);
    }

    /// A full v2 event (what `GET /v2/core/events/{id}` returns).
    pub fn add_v2_event(&self, event: serde_json::Value) {
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        self.lock().v2_events.insert(id, event);
    }

    /// The line items of a checkout session or an invoice: `path` is
    /// `/v1/checkout/sessions/{id}/line_items` or `/v1/invoices/{id}/lines`.
    pub fn add_lines(&self, path: &str, items: Vec<serde_json::Value>) {
        self.lock().lists.insert(path.to_owned(), items);
    }

    /// The payments of an invoice (`invoice_payment` objects).
    pub fn add_invoice_payments(&self, invoice: &str, payments: Vec<serde_json::Value>) {
        self.lock().invoice_payments.insert(invoice.to_owned(), payments);
    }

    /// The refunds of a payment intent (`refund` objects), newest first as Stripe lists them.
    pub fn add_refunds(&self, payment_intent: &str, refunds: Vec<serde_json::Value>) {
        self.lock().refunds.insert(payment_intent.to_owned(), refunds);
    }

    /// The credit notes of an invoice (`credit_note` objects, their lines embedded).
    pub fn add_credit_notes(&self, invoice: &str, notes: Vec<serde_json::Value>) {
        self.lock().credit_notes.insert(invoice.to_owned(), notes);
    }

    /// A price `id`, active or archived, with this lookup key.
    pub fn add_price(&self, id: &str, lookup_key: Option<&str>, active: bool) {
        let mut price = fixture("price");
        price["id"] = serde_json::json!(id);
        price["lookup_key"] = serde_json::json!(lookup_key);
        price["active"] = serde_json::json!(active);
        self.lock().prices.push(price);
    }

    /// Sets the price `id`'s `unit_amount` (smallest currency unit; the fixture's otherwise).
    pub fn set_unit_amount(&self, id: &str, amount: i64) {
        for price in self.lock().prices.iter_mut().filter(|p| p["id"] == id) {
            price["unit_amount"] = serde_json::json!(amount);
            price["unit_amount_decimal"] = serde_json::json!(amount.to_string());
        }
    }

    /// Sets `customer`'s currency (Stripe's customer `currency`, set by its first invoice or
    /// subscription): an invoice created without `currency` is in it.
    pub fn set_customer_currency(&self, customer: &str, currency: &str) {
        self.lock().customer_currency.insert(customer.to_owned(), currency.to_owned());
    }

    /// Sets the price `id`'s `currency` (the fixture's `usd` otherwise).
    pub fn set_price_currency(&self, id: &str, currency: &str) {
        for price in self.lock().prices.iter_mut().filter(|p| p["id"] == id) {
            price["currency"] = serde_json::json!(currency);
        }
    }

    /// Faults for the next invoice writes, in order: `Status` answers without executing,
    /// `Saved` fails while executing (replayed under its key), `Drop` closes the connection
    /// unexecuted, `TakeAndHang` executes and loses the answer (the connection closes).
    pub fn fail_next_invoice_writes(&self, faults: &[Fault]) {
        self.lock().invoice_faults.extend(faults.iter().copied());
    }

    /// `customer`'s credit balance (what Stripe applies to its next finalized invoice).
    pub fn set_credit_balance(&self, customer: &str, amount: i64) {
        self.lock().credit_balances.insert(customer.to_owned(), amount);
    }

    /// Adds `amount` to `customer`'s credit balance (a credit note to the balance), or takes
    /// it away when negative (a note voided: "Voiding a credit note reverses its customer
    /// balance transaction"); the balance may go below zero, a debit the next invoice adds.
    pub fn add_credit_balance(&self, customer: &str, amount: i64) {
        *self.lock().credit_balances.entry(customer.to_owned()).or_default() += amount;
    }

    /// What `customer`'s default payment method does when an invoice is paid.
    pub fn set_card(&self, customer: &str, card: Card) {
        self.lock().cards.insert(customer.to_owned(), card);
    }

    /// The events payments emitted since the last call (`invoice.paid`,
    /// `invoice.payment_failed`), as Stripe sends them, oldest first.
    pub fn take_emitted(&self) -> Vec<serde_json::Value> {
        std::mem::take(&mut self.lock().emitted)
    }

    /// The payment intent that paid `invoice` (through the API's pay).
    pub fn payment_intent_of(&self, invoice: &str) -> Option<String> {
        let s = self.lock();
        let payments = s.invoice_payments.get(invoice)?;
        payments.iter().find_map(|p| p["payment"]["payment_intent"].as_str().map(str::to_owned))
    }

    /// How many `POST /v1/invoices/{id}/pay` calls were executed (not replayed), refused ones
    /// included.
    pub fn pays(&self) -> u64 {
        self.lock().pays
    }

    /// How many `POST /v1/invoices/{id}/void` calls were executed, refused ones included.
    pub fn voids(&self) -> u64 {
        self.lock().voids
    }

    /// Settles the processing bank debit of `invoice`: it succeeds (the invoice paid,
    /// `invoice.paid` and `invoice.payment_succeeded` emitted) or fails (the invoice stays
    /// open, `invoice.payment_failed` emitted).
    pub fn settle_debit(&self, invoice: &str, succeeds: bool) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let intent = s.processing.remove(invoice).unwrap_or_else(|| panic!("no debit of {invoice} is processing"));
        let now = s.now();
        let key = format!("/v1/invoices/{invoice}");
        let mut inv = s.objects.get(&key).cloned().expect("an invoice");
        let status = if succeeds { "succeeded" } else { "requires_payment_method" };
        let pi = serde_json::json!({ "id": intent, "object": "payment_intent", "status": status });
        s.objects.insert(format!("/v1/payment_intents/{intent}"), pi);
        if succeeds {
            pay_now(s, &mut inv, invoice, now);
            // Paid by the intent that processed.
            if let Some(p) = s.invoice_payments.get_mut(invoice).and_then(|p| p.first_mut()) {
                p["payment"]["payment_intent"] = serde_json::json!(intent);
            }
        } else {
            if let Some(p) = s.invoice_payments.get_mut(invoice).and_then(|p| p.first_mut()) {
                p["status"] = serde_json::json!("canceled");
            }
            let event = emitted_event(s, "invoice.payment_failed", &inv, now);
            s.emitted.push(event);
        }
        s.objects.insert(key, inv);
    }

    /// As [`pay_on_page`](Self::pay_on_page), if the invoice is still open (a recharge's own
    /// pass may have paid it meanwhile): whether it was paid here.
    pub fn pay_on_page_if_open(&self, invoice: &str) -> bool {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = s.now();
        let key = format!("/v1/invoices/{invoice}");
        let mut inv = s.objects.get(&key).cloned().expect("an invoice");
        if inv["status"] != "open" {
            return false;
        }
        pay_now(s, &mut inv, invoice, now);
        s.objects.insert(key, inv);
        true
    }

    /// The customer pays the open `invoice` on its hosted page (after 3-D Secure): paid,
    /// `invoice.paid` and `invoice.payment_succeeded` emitted.
    pub fn pay_on_page(&self, invoice: &str) {
        assert!(self.pay_on_page_if_open(invoice), "only an open invoice is paid on its page");
    }

    /// The invoices whose bank debit is processing (a delayed payment method), oldest id first.
    pub fn processing_debits(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().processing.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The invoices created through the API.
    pub fn invoices_created(&self) -> Vec<serde_json::Value> {
        let s = self.lock();
        s.created_invoices.iter().filter_map(|id| s.objects.get(&format!("/v1/invoices/{id}")).cloned()).collect()
    }

    /// Moves `lookup_key` to the price `to` (`transfer_lookup_key`), archiving the price
    /// that had it.
    pub fn move_lookup_key(&self, lookup_key: &str, to: &str) {
        for price in &mut self.lock().prices {
            if price["lookup_key"] == lookup_key {
                price["lookup_key"] = serde_json::Value::Null;
                price["active"] = serde_json::json!(false);
            }
            if price["id"] == to {
                price["lookup_key"] = serde_json::json!(lookup_key);
            }
        }
    }

    /// Reads of the list of prices so far.
    pub fn price_reads(&self) -> u64 {
        self.lock().price_reads
    }

    /// An invoice (an `invoice` object), retrieved at `/v1/invoices/{id}` ("Retrieve an
    /// invoice").
    pub fn add_invoice(&self, invoice: serde_json::Value) {
        let id = invoice["id"].as_str().unwrap_or_default().to_owned();
        self.lock().objects.insert(format!("/v1/invoices/{id}"), invoice);
    }

    /// A payment intent with this `status` (`succeeded`, `requires_capture`), retrieved at
    /// `/v1/payment_intents/{id}` ("Retrieve a PaymentIntent").
    pub fn add_payment_intent(&self, id: &str, status: &str) {
        let intent = serde_json::json!({ "id": id, "object": "payment_intent", "status": status });
        self.lock().objects.insert(format!("/v1/payment_intents/{id}"), intent);
    }

    /// A checkout session, retrieved at `/v1/checkout/sessions/{id}` and listed by its payment
    /// intent ("List all Checkout Sessions": `payment_intent`, "Only return the Checkout
    /// Session for the PaymentIntent specified").
    pub fn add_session(&self, session: serde_json::Value) {
        let id = session["id"].as_str().unwrap_or_default().to_owned();
        let mut s = self.lock();
        s.objects.insert(format!("/v1/checkout/sessions/{id}"), session.clone());
        s.sessions.push(session);
    }

    /// Refuses the reads whose path starts with `prefix` (`/v1/invoice_payments`) with
    /// `status` (401, 403 or 404), as Stripe answers a key that may not read them; `None`
    /// lifts every refusal.
    pub fn refuse_reads(&self, refusal: Option<(&str, u16)>) {
        let mut s = self.lock();
        match refusal {
            Some((prefix, status)) => s.refused_reads.push((prefix.to_owned(), status)),
            None => s.refused_reads.clear(),
        }
    }

    /// The next `n` reads of line items answer 500.
    pub fn fail_reads(&self, n: u32) {
        self.lock().failing_reads = n;
    }

    /// Reads of line items and invoice payments so far.
    pub fn list_reads(&self) -> u64 {
        self.lock().list_reads
    }

    /// Reads of v2 events so far.
    pub fn v2_reads(&self) -> u64 {
        self.lock().v2_reads
    }

    /// Reads of the event summaries so far.
    pub fn summary_reads(&self) -> u64 {
        self.lock().summary_reads
    }

    /// What Stripe would bill: per (customer, event name), sum meters add every event,
    /// pre-aggregated ones the newest event of each window.
    pub fn totals(&self) -> BTreeMap<(String, String), i64> {
        let s = self.lock();
        let mut out = BTreeMap::new();
        let mut newest: BTreeMap<(String, String, i64), (i64, i64)> = BTreeMap::new();
        for e in s.events.iter().filter(|e| !s.lost.contains(&e.identifier)) {
            match s.meters.get(&e.event_name).copied().flatten() {
                None => *out.entry((e.customer.clone(), e.event_name.clone())).or_insert(0) += e.value,
                Some(w) => {
                    let slot = newest
                        .entry((e.customer.clone(), e.event_name.clone(), e.timestamp - e.timestamp.rem_euclid(w)))
                        .or_insert((i64::MIN, 0));
                    if e.timestamp >= slot.0 {
                        *slot = (e.timestamp, e.value);
                    }
                }
            }
        }
        for ((customer, name, _), (_, value)) in newest {
            *out.entry((customer, name)).or_insert(0) += value;
        }
        out
    }
}

/// One of Stripe's complete example objects (tests/fixtures/stripe_objects.json).
fn fixture(name: &str) -> serde_json::Value {
    // Beside this file, whichever package includes it.
    let text = include_str!("../fixtures/stripe_objects.json");
    serde_json::from_str::<serde_json::Value>(text).unwrap()["resources"][name].clone()
}

async fn connection(socket: TcpStream, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(socket);
    while let Some(req) = read_request(&mut reader).await {
        let answer = handle(&req, &state).await;
        let Some((status, body, content_type)) = answer else {
            // Dropped (or hung, then dropped when the caller goes away).
            return;
        };
        // Stripe marks what a retry cannot change.
        let retry = if status == 400 { "stripe-should-retry: false\r\n" } else { "" };
        let extra = format!("request-id: req_standin\r\n{retry}");
        if !write_answer(&mut reader, status, content_type, &extra, &body).await {
            return;
        }
    }
}

fn error(status: u16, kind: &str, code: &str, message: &str) -> (u16, String, &'static str) {
    // Stripe leaves `code` out when there is none.
    let mut error = serde_json::json!({ "type": kind, "message": message });
    if !code.is_empty() {
        error["code"] = serde_json::json!(code);
    }
    (status, serde_json::json!({ "error": error }).to_string(), "application/json")
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(req: &Request, state: &Arc<Mutex<State>>) -> Option<(u16, String, &'static str)> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    if req.method == "GET" {
        // Reads take no injected fault (those are for the meter events).
        if req.headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {SECRET}")) {
            return Some(error(401, "invalid_request_error", "api_key_invalid", "Invalid API Key provided"));
        }
        return Some(read(req, &mut lock()));
    }
    if req.path == "/v1/invoices" || req.path.starts_with("/v1/invoices/") || req.path == "/v1/invoiceitems" {
        // Invoice writes take no injected fault either (those are for the meter events).
        if req.headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {SECRET}")) {
            return Some(error(401, "invalid_request_error", "api_key_invalid", "Invalid API Key provided"));
        }
        return idempotent(req, &mut lock());
    }
    let fault = {
        let mut s = lock();
        s.calls += 1;
        s.faults.pop_front()
    };
    if req.headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {SECRET}")) {
        return Some(error(401, "invalid_request_error", "api_key_invalid", "Invalid API Key provided"));
    }
    if req.method != "POST" || req.path != "/v1/billing/meter_events" {
        return Some(error(404, "invalid_request_error", "resource_missing", "Unrecognized request URL"));
    }
    match fault {
        Some(Fault::Status(st)) => {
            let kind = if st == 429 { "rate_limit" } else { "api_error" };
            return Some(error(st, kind, kind, "injected fault"));
        }
        Some(Fault::NotJson(st)) => return Some((st, "<html>bad gateway</html>".into(), "text/html")),
        Some(Fault::Drop) => return None,
        _ => {}
    }
    let form: BTreeMap<String, String> = std::str::from_utf8(&req.body)
        .ok()?
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('=').map(|(k, v)| (decode(k), decode(v))))
        .collect();
    let fingerprint = format!("{form:?}");
    let key = req.headers.get("idempotency-key").cloned();
    *lock().sends.entry(form.get("identifier").cloned().unwrap_or_default()).or_default() += 1;
    let now = lock().now();
    if let Some(answer) = key.as_deref().and_then(|key| replayed(&mut lock(), key, &fingerprint, now)) {
        return Some(answer);
    }
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let (event_name, identifier, customer) = (get("event_name"), get("identifier"), get("payload[stripe_customer_id]"));
    if let Some(Fault::Saved(st)) = fault {
        let answer = error(st, "api_error", "api_error", "injected failure while executing");
        if let Some(key) = key {
            lock().idempotency.insert(key, (fingerprint, answer.0, answer.1.clone(), now));
        }
        return Some(answer);
    }
    let customer_fault = lock().customer_faults.get(&customer).copied();
    if let Some(st) = customer_fault {
        if st == 0 {
            // A dropped connection.
            return None;
        }
        let kind = if st == 429 { "rate_limit" } else { "api_error" };
        return Some(error(st, kind, kind, "injected fault for this customer"));
    }
    let lane = (customer.clone(), event_name.clone());
    {
        let mut s = lock();
        if !s.in_flight.insert(lane.clone()) {
            s.lock_conflicts += 1;
            return Some(error(
                429,
                "invalid_request_error",
                "lock_timeout",
                "This object cannot be accessed right now because another API request or Stripe process is currently accessing it",
            ));
        }
        s.concurrent += 1;
        s.max_concurrent = s.max_concurrent.max(s.concurrent);
    }
    // The call takes a little time, so concurrent calls overlap.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let answer = execute(&form, &event_name, &identifier, &customer, &mut lock());
    {
        let mut s = lock();
        s.in_flight.remove(&lane);
        s.concurrent -= 1;
        if let Some(key) = key {
            s.idempotency.insert(key, (fingerprint, answer.0, answer.1.clone(), now));
        }
    }
    if fault == Some(Fault::TakeAndHang) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return None;
    }
    Some(answer)
}

/// A form body's parameters.
fn form_of(req: &Request) -> BTreeMap<String, String> {
    std::str::from_utf8(&req.body)
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('=').map(|(k, v)| (decode(k), decode(v))))
        .collect()
}

/// The answer saved under `key` (keys are forgotten 24 hours after their first use): the
/// first answer again for the same parameters, 400 `idempotency_error` for others.
fn replayed(s: &mut State, key: &str, fingerprint: &str, now: i64) -> Option<(u16, String, &'static str)> {
    s.idempotency.retain(|_, (_, _, _, at)| *at + 86_400 > now);
    let (seen, status, body, _) = s.idempotency.get(key).cloned()?;
    if seen != fingerprint {
        return Some(error(
            400,
            "idempotency_error",
            "idempotency_key_in_use",
            "Keys for idempotent requests can only be used with the same parameters they were first used with",
        ));
    }
    s.replays += 1;
    Some((status, body, "application/json"))
}

/// An invoice write ([`write`]) under Stripe's idempotency rules ("Idempotent requests"): a key seen before with
/// the same parameters answers the first answer again (failures included); with other
/// parameters, 400 `idempotency_error`; keys are forgotten 24 hours after their first use.
fn idempotent(req: &Request, s: &mut State) -> Option<(u16, String, &'static str)> {
    let form = form_of(req);
    let fingerprint = format!("{} {form:?}", req.path);
    let now = s.now();
    let key = req.headers.get("idempotency-key").cloned();
    if let Some(answer) = key.as_deref().and_then(|key| replayed(s, key, &fingerprint, now)) {
        return Some(answer);
    }
    let fault = s.invoice_faults.pop_front();
    let answer = match fault {
        Some(Fault::Status(st)) => return Some(error(st, "api_error", "api_error", "injected fault")),
        Some(Fault::Invalid(st)) => {
            return Some(error(st, "invalid_request_error", "resource_missing", "No such customer: 'cus_gone'"))
        }
        Some(Fault::NotJson(st)) => return Some((st, "<html>bad gateway</html>".into(), "text/html")),
        Some(Fault::Drop) => return None,
        Some(Fault::Saved(st)) => error(st, "api_error", "api_error", "injected failure while executing"),
        Some(Fault::TakeAndHang | Fault::Pass) | None => write(&req.path, &form, s),
    };
    // "Results are only saved if an API endpoint started executing": a request refused by its
    // parameters' validation is not, and may be sent again under its key.
    let validation = answer.0 == 404 || (answer.0 == 400 && answer.1.contains("\"parameter_"));
    if let (Some(key), false) = (key, validation) {
        s.idempotency.insert(key, (fingerprint, answer.0, answer.1.clone(), now));
    }
    match fault {
        Some(Fault::TakeAndHang) => None,
        _ => Some(answer),
    }
}

/// The invoice writes of Stripe's API reference: "Create an invoice" (`POST /v1/invoices`: a
/// draft), "Create an invoice item" (`POST /v1/invoiceitems` on a draft invoice of the same
/// customer, `pricing[price]` or `price`, `quantity`), "Finalize an invoice" (draft → open),
/// "Pay an invoice" (open → paid, with a payment intent, the invoice's payments and lines
/// listed, and `invoice.paid` emitted; a declined card answers 402 `card_error`
/// `card_declined` (changelog 2017-12-14) and emits `invoice.payment_failed`; a customer
/// without a payment method answers 400 "This customer has no attached payment source or
/// default payment method."; an invoice already paid answers 400 `invoice_already_paid`).
fn write(path: &str, form: &BTreeMap<String, String>, s: &mut State) -> (u16, String, &'static str) {
    let invalid = |code: &str, m: &str| error(400, "invalid_request_error", code, m);
    let now = s.now();
    let get = |k: &str| form.get(k).cloned();
    if path == "/v1/invoices" {
        let Some(customer) = get("customer") else {
            return invalid("parameter_missing", "Missing required param: customer.");
        };
        s.created += 1;
        let id = format!("in_api{}", s.created);
        let mut inv = fixture("invoice");
        let metadata: serde_json::Map<String, serde_json::Value> = form
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                    .map(|k| (k.to_owned(), serde_json::json!(v)))
            })
            .collect();
        inv["id"] = serde_json::json!(id);
        inv["customer"] = serde_json::json!(customer);
        inv["status"] = serde_json::json!("draft");
        inv["created"] = serde_json::json!(now);
        inv["metadata"] = serde_json::Value::Object(metadata);
        s.created_invoices.push(id.clone());
        inv["collection_method"] = serde_json::json!(get("collection_method").unwrap_or("charge_automatically".into()));
        // "currency: The currency to create this invoice in. Defaults to that of customer if
        // not specified."
        let currency =
            get("currency").unwrap_or_else(|| s.customer_currency.get(&customer).cloned().unwrap_or("usd".into()));
        inv["currency"] = serde_json::json!(currency);
        inv["automatic_tax"]["enabled"] = serde_json::json!(get("automatic_tax[enabled]").as_deref() == Some("true"));
        // "Defaults to false" for an invoice created through the API.
        inv["auto_advance"] = serde_json::json!(get("auto_advance").as_deref() == Some("true"));
        inv["next_payment_attempt"] = serde_json::Value::Null;
        for k in ["total", "subtotal", "amount_due", "amount_paid", "amount_remaining"] {
            inv[k] = serde_json::json!(0);
        }
        // "pending_invoice_items_behavior: … Defaults to exclude if the parameter is omitted."
        let pulled: Vec<serde_json::Value> = if get("pending_invoice_items_behavior").as_deref() == Some("include") {
            let (mine, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut s.pending_items).into_iter().partition(|(c, _)| *c == customer);
            s.pending_items = rest;
            mine.into_iter().map(|(_, line)| line).collect()
        } else {
            Vec::new()
        };
        inv["lines"] = serde_json::json!({ "object": "list", "data": [], "has_more": false,
            "url": format!("/v1/invoices/{id}/lines") });
        inv["status_transitions"] = serde_json::json!({ "finalized_at": null, "paid_at": null,
            "marked_uncollectible_at": null, "voided_at": null });
        for mut line in pulled {
            line["invoice"] = serde_json::json!(id);
            add_line(&mut inv, line);
        }
        s.objects.insert(format!("/v1/invoices/{id}"), inv.clone());
        return (200, inv.to_string(), "application/json");
    }
    if path == "/v1/invoiceitems" {
        let Some(customer) = get("customer") else {
            return invalid("parameter_missing", "Missing required param: customer.");
        };
        let Some(price) = get("pricing[price]").or_else(|| get("price")) else {
            return invalid("parameter_missing", "Missing required param: pricing[price] or amount.");
        };
        let Some(unit) =
            s.prices.iter().find(|p| p["id"] == price.as_str()).map(|p| p["unit_amount"].as_i64().unwrap_or(0))
        else {
            return error(404, "invalid_request_error", "resource_missing", &format!("No such price: '{price}'"));
        };
        let quantity = get("quantity").map_or(Ok(1), |q| q.parse::<i64>()).unwrap_or(-1);
        if quantity < 1 {
            return invalid("parameter_invalid_integer", "Invalid integer: quantity");
        }
        let invoice = get("invoice");
        let target = invoice.as_ref().map(|i| format!("/v1/invoices/{i}"));
        if let Some(t) = &target {
            match s.objects.get(t) {
                None => return error(404, "invalid_request_error", "resource_missing", "No such invoice"),
                Some(inv) if inv["customer"] != customer.as_str() => {
                    return invalid("parameter_invalid", "The invoice belongs to another customer.")
                }
                Some(inv) if inv["status"] != "draft" => {
                    return invalid("invoice_not_editable", "You can only add invoice items to draft invoices.")
                }
                // A price in another currency than the invoice's is refused ("Create an
                // invoice item": the item's currency is its price's; an invoice holds one).
                Some(inv)
                    if s.prices
                        .iter()
                        .find(|p| p["id"] == price.as_str())
                        .is_some_and(|p| p["currency"] != inv["currency"]) =>
                {
                    return invalid(
                        "parameter_invalid",
                        "The price's currency must match the currency of the invoice it is added to.",
                    )
                }
                _ => {}
            }
        }
        s.created += 1;
        let item_id = format!("ii_api{}", s.created);
        let amount = unit * quantity;
        let mut item = fixture("invoiceitem");
        item["id"] = serde_json::json!(item_id);
        item["customer"] = serde_json::json!(customer);
        item["invoice"] = serde_json::json!(invoice);
        item["amount"] = serde_json::json!(amount);
        item["net_amount"] = serde_json::json!(amount);
        item["quantity"] = serde_json::json!(quantity);
        item["quantity_decimal"] = serde_json::json!(quantity.to_string());
        item["date"] = serde_json::json!(now);
        item["parent"] = serde_json::Value::Null;
        item["pricing"] = serde_json::json!({ "type": "price_details",
            "price_details": { "price": price, "product": "prod_1" }, "unit_amount_decimal": unit.to_string() });
        let mut line = fixture("line_item");
        line["id"] = serde_json::json!(format!("il_api{}", s.created));
        line["invoice"] = serde_json::json!(invoice);
        line["amount"] = serde_json::json!(amount);
        line["quantity"] = serde_json::json!(quantity);
        line["pricing"] = serde_json::json!({ "type": "price_details",
            "price_details": { "price": price, "product": "prod_1" }, "unit_amount_decimal": unit.to_string() });
        line["parent"] = serde_json::json!({ "type": "invoice_item_details", "invoice_item_details":
            { "invoice_item": item_id, "proration": false, "proration_details": { "credited_items": null },
              "subscription": null }, "subscription_item_details": null });
        line["discount_amounts"] = serde_json::json!([]);
        line["pretax_credit_amounts"] = serde_json::json!([]);
        line["taxes"] = serde_json::json!([]);
        match target {
            Some(t) => add_line(s.objects.get_mut(&t).expect("checked above"), line),
            // No invoice: pending, for the customer's next invoice that includes them.
            None => s.pending_items.push((customer, line)),
        }
        return (200, item.to_string(), "application/json");
    }
    let (id, action) = path.trim_start_matches("/v1/invoices/").split_once('/').unwrap_or(("", ""));
    let key = format!("/v1/invoices/{id}");
    let Some(mut inv) = s.objects.get(&key).cloned() else {
        return error(404, "invalid_request_error", "resource_missing", &format!("No such invoice: '{id}'"));
    };
    match action {
        "finalize" => {
            if inv["status"] != "draft" {
                return invalid(
                    "invoice_not_editable",
                    "This invoice is already finalized, you can't re-finalize a non-draft invoice.",
                );
            }
            inv["status"] = serde_json::json!("open");
            inv["status_transitions"]["finalized_at"] = serde_json::json!(now);
            // "hosted_invoice_url: The URL for the hosted invoice page, which allows customers
            // to view and pay an invoice. If the invoice has not been finalized yet, this will
            // be null." (API reference, "The Invoice object").
            inv["hosted_invoice_url"] =
                serde_json::json!(format!("https://invoice.stripe.com/i/acct_standin/test_{id}"));
            // The customer's credit balance is applied at finalization ("Customer credit
            // balance"); an invoice it covers, or whose amount due is under the minimum charge
            // (0.50), is paid at once without a payment (the rest debited to the balance).
            let customer = inv["customer"].as_str().unwrap_or_default().to_owned();
            let total = inv["total"].as_i64().unwrap_or(0);
            // A debit (a balance below zero) is added to the amount due ("Customer credit
            // balance": a positive customer balance, Stripe's sign, increases the next invoice).
            let credit = s.credit_balances.get(&customer).copied().unwrap_or(0).min(total.max(0));
            let due = total - credit;
            *s.credit_balances.entry(customer).or_default() -= credit;
            inv["starting_balance"] = serde_json::json!(-credit);
            inv["amount_due"] = serde_json::json!(due);
            inv["amount_remaining"] = serde_json::json!(due);
            let finalized = emitted_event(s, "invoice.finalized", &inv, now);
            s.emitted.push(finalized);
            if due < 50 {
                let customer = inv["customer"].as_str().unwrap_or_default().to_owned();
                *s.credit_balances.entry(customer).or_default() -= due;
                inv["status"] = serde_json::json!("paid");
                inv["amount_paid"] = serde_json::json!(0);
                inv["amount_remaining"] = serde_json::json!(0);
                inv["status_transitions"]["paid_at"] = serde_json::json!(now);
                s.lists.insert(
                    format!("/v1/invoices/{id}/lines"),
                    inv["lines"]["data"].as_array().cloned().unwrap_or_default(),
                );
                let paid = emitted_event(s, "invoice.paid", &inv, now);
                s.emitted.push(paid);
            }
        }
        "pay" => {
            if inv["status"] == "paid" {
                return invalid("invoice_already_paid", "Invoice is already paid");
            }
            s.pays += 1;
            if s.processing.contains_key(id) {
                return invalid("", "This invoice's payment is processing and cannot be paid again.");
            }
            if inv["status"] != "open" {
                return invalid("invoice_not_open", "You can only pay an open invoice.");
            }
            let customer = inv["customer"].as_str().unwrap_or_default().to_owned();
            match s.cards.get(&customer).copied().unwrap_or(Card::Pays) {
                Card::Missing => {
                    return invalid("", "This customer has no attached payment source or default payment method.")
                }
                Card::RequiresAction => {
                    // Error code `invoice_payment_intent_requires_action` ("Error codes"): the
                    // invoice stays open for the customer to authenticate.
                    inv["attempted"] = serde_json::json!(true);
                    s.objects.insert(key, inv.clone());
                    let event = emitted_event(s, "invoice.payment_action_required", &inv, now);
                    s.emitted.push(event);
                    let body = serde_json::json!({ "error": { "type": "card_error",
                        "code": "invoice_payment_intent_requires_action",
                        "message": "This payment requires additional user action before it can be completed \
                                    successfully. Payment can be completed using the PaymentIntent associated \
                                    with the invoice." } });
                    return (402, body.to_string(), "application/json");
                }
                Card::Declined => {
                    inv["attempted"] = serde_json::json!(true);
                    s.objects.insert(key, inv.clone());
                    let event = emitted_event(s, "invoice.payment_failed", &inv, now);
                    s.emitted.push(event);
                    let body = serde_json::json!({ "error": { "type": "card_error", "code": "card_declined",
                        "decline_code": "generic_decline", "message": "Your card was declined." } });
                    return (402, body.to_string(), "application/json");
                }
                Card::Pays => {
                    pay_now(s, &mut inv, id, now);
                    s.objects.insert(key, inv.clone());
                    return (200, inv.to_string(), "application/json");
                }
                Card::BankDebit => {
                    // The debit is initiated: the invoice stays open while its payment
                    // processes, for days.
                    inv["attempted"] = serde_json::json!(true);
                    inv["attempt_count"] = serde_json::json!(inv["attempt_count"].as_i64().unwrap_or(0) + 1);
                    // Its payment: an invoice payment `open` of a payment intent `processing`
                    // ("The PaymentIntent object": `status` `processing`; "Invoice Payment":
                    // `status` `open` until paid or canceled).
                    s.created += 1;
                    let intent = format!("pi_api{}", s.created);
                    let mut payment = fixture("invoice_payment");
                    payment["id"] = serde_json::json!(format!("inpay_api{}", s.created));
                    payment["invoice"] = serde_json::json!(id);
                    payment["status"] = serde_json::json!("open");
                    payment["payment"] = serde_json::json!({ "type": "payment_intent", "payment_intent": intent });
                    s.invoice_payments.insert(id.to_owned(), vec![payment]);
                    let pi = serde_json::json!({ "id": intent, "object": "payment_intent", "status": "processing" });
                    s.objects.insert(format!("/v1/payment_intents/{intent}"), pi);
                    s.processing.insert(id.to_owned(), intent);
                    s.objects.insert(key, inv.clone());
                    return (200, inv.to_string(), "application/json");
                }
            }
        }
        // "Void an invoice": only an open one (a draft is deleted instead, a paid one cannot
        // be voided); it is then `void`, never paid, and `invoice.voided` is emitted.
        "void" => {
            s.voids += 1;
            if s.processing.contains_key(id) {
                return invalid("", "This invoice's payment is processing and it cannot be voided.");
            }
            if inv["status"] != "open" {
                return invalid("invoice_not_open", "You can only void an open invoice.");
            }
            inv["status"] = serde_json::json!("void");
            inv["status_transitions"]["voided_at"] = serde_json::json!(now);
            let voided = emitted_event(s, "invoice.voided", &inv, now);
            s.emitted.push(voided);
        }
        _ => return error(404, "invalid_request_error", "resource_missing", "Unrecognized request URL"),
    }
    s.objects.insert(key, inv.clone());
    (200, inv.to_string(), "application/json")
}

/// `inv` (the invoice `id`) paid now by a payment intent of its own: its payment listed, its
/// lines, `invoice.paid` and `invoice.payment_succeeded` emitted.
fn pay_now(s: &mut State, inv: &mut serde_json::Value, id: &str, now: i64) {
    s.created += 1;
    let intent = format!("pi_api{}", s.created);
    inv["status"] = serde_json::json!("paid");
    inv["amount_paid"] = inv["amount_due"].clone();
    inv["amount_remaining"] = serde_json::json!(0);
    inv["attempted"] = serde_json::json!(true);
    inv["attempt_count"] = serde_json::json!(inv["attempt_count"].as_i64().unwrap_or(0) + 1);
    inv["status_transitions"]["paid_at"] = serde_json::json!(now);
    let mut payment = fixture("invoice_payment");
    payment["id"] = serde_json::json!(format!("inpay_api{}", s.created));
    payment["invoice"] = serde_json::json!(id);
    payment["status"] = serde_json::json!("paid");
    payment["payment"] = serde_json::json!({ "type": "payment_intent", "payment_intent": intent });
    s.invoice_payments.insert(id.to_owned(), vec![payment]);
    s.lists.insert(format!("/v1/invoices/{id}/lines"), inv["lines"]["data"].as_array().cloned().unwrap_or_default());
    let event = emitted_event(s, "invoice.paid", inv, now);
    s.emitted.push(event);
    let event = emitted_event(s, "invoice.payment_succeeded", inv, now);
    s.emitted.push(event);
}

/// `line` added to the draft `inv`, its amounts with it.
fn add_line(inv: &mut serde_json::Value, line: serde_json::Value) {
    let amount = line["amount"].as_i64().unwrap_or(0);
    inv["lines"]["data"].as_array_mut().expect("a list").push(line);
    for k in ["total", "subtotal", "amount_due", "amount_remaining"] {
        inv[k] = serde_json::json!(inv[k].as_i64().unwrap_or(0) + amount);
    }
}

/// An event of `kind` about `object`, as Stripe sends it to a webhook endpoint.
fn emitted_event(s: &mut State, kind: &str, object: &serde_json::Value, now: i64) -> serde_json::Value {
    s.created += 1;
    let mut event = fixture("event");
    event["id"] = serde_json::json!(format!("evt_api{}", s.created));
    event["type"] = serde_json::json!(kind);
    event["created"] = serde_json::json!(now);
    event["data"] = serde_json::json!({ "object": object });
    event
}

fn execute(
    form: &BTreeMap<String, String>,
    event_name: &str,
    identifier: &str,
    customer: &str,
    s: &mut State,
) -> (u16, String, &'static str) {
    let invalid = |m: &str| error(400, "invalid_request_error", "parameter_invalid", m);
    if !s.meters.contains_key(event_name) {
        return invalid(&format!("No active meter was found with event_name `{event_name}`"));
    }
    if customer.is_empty() {
        return invalid("payload[stripe_customer_id] is required");
    }
    // The payload's other keys: the meter's dimensions, each one it lists.
    let listed = s.dimension_keys.get(event_name).cloned().unwrap_or_default();
    let mut dims = BTreeMap::new();
    for (k, v) in form {
        let Some(key) = k.strip_prefix("payload[").and_then(|k| k.strip_suffix(']')) else { continue };
        if key == "stripe_customer_id" || key == "value" {
            continue;
        }
        dims.insert(key.to_owned(), v.clone());
    }
    if dims.len() > listed.len() {
        return error(
            400,
            "invalid_request_error",
            "meter_event_dimension_count_too_high",
            &format!(
                "The meter `{event_name}` lists {} dimension payload keys; the event has {}",
                listed.len(),
                dims.len()
            ),
        );
    }
    if let Some(k) = dims.keys().find(|k| !listed.contains(k)) {
        return invalid(&format!("`{k}` is not among the dimension_payload_keys of the meter `{event_name}`"));
    }
    let Ok(value) = form.get("payload[value]").map_or("", String::as_str).parse::<i64>() else {
        return invalid("payload[value] must be a whole number");
    };
    let now = s.now();
    let timestamp = match form.get("timestamp") {
        None => now,
        Some(t) => match t.parse::<i64>() {
            Ok(t) => t,
            Err(_) => return invalid("timestamp must be an integer"),
        },
    };
    if timestamp < now - 35 * 86_400 || timestamp > now + 300 {
        return invalid("timestamp must be within the past 35 calendar days and no more than 5 minutes in the future");
    }
    if identifier.len() > 100 {
        return invalid("identifier must be at most 100 characters");
    }
    let body = serde_json::json!({
        "object": "billing.meter_event",
        "created": now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": false,
        "payload": { "stripe_customer_id": customer, "value": value.to_string() },
        "timestamp": timestamp,
    })
    .to_string();
    if !identifier.is_empty() && !s.identifiers.insert(identifier.to_owned()) {
        s.duplicates += 1;
        // As Stripe answers it: no `code`, only the message.
        let body = serde_json::json!({ "error": {
            "type": "invalid_request_error",
            "message": format!("An event already exists with identifier {identifier}."),
        } })
        .to_string();
        return (400, body, "application/json");
    }
    if !dims.is_empty() {
        s.dimensions.insert(identifier.to_owned(), dims);
    }
    s.forms.push(form.clone());
    s.events.push(Accepted {
        identifier: identifier.to_owned(),
        event_name: event_name.to_owned(),
        customer: customer.to_owned(),
        value,
        timestamp,
    });
    s.accepted_at.push(now);
    (200, body, "application/json")
}

/// The meters, sorted by event name, with their stand-in ids.
fn meter_ids(s: &State) -> Vec<(String, String)> {
    let mut names: Vec<&String> = s.meters.keys().collect();
    names.sort();
    names.into_iter().enumerate().map(|(i, n)| (format!("mtr_standin_{i:04}"), n.clone())).collect()
}

/// `GET` requests: the meter list and the event summaries.
fn read(req: &Request, s: &mut State) -> (u16, String, &'static str) {
    let (path, query) = req.path.split_once('?').unwrap_or((req.path.as_str(), ""));
    if let Some(id) = path.strip_prefix("/v2/core/events/") {
        if !req.headers.contains_key("stripe-version") {
            return error(
                400,
                "invalid_request_error",
                "missing_api_version",
                "A Stripe-Version header is required for v2 endpoints",
            );
        }
        s.v2_reads += 1;
        return match s.v2_events.get(id) {
            Some(event) => (200, event.to_string(), "application/json"),
            None => error(404, "invalid_request_error", "resource_missing", &format!("No such event: '{id}'")),
        };
    }
    let q: BTreeMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('=').map(|(k, v)| (decode(k), decode(v))))
        .collect();
    let invalid = |m: &str| error(400, "invalid_request_error", "parameter_invalid", m);
    // Stripe's documented refusals ("Errors": 401 "No valid API key provided", 403 "The API key
    // doesn't have permissions to perform the request", 404 "The requested resource doesn't
    // exist"; a restricted key's 403 names the permission that would allow the request).
    // A key of another account (404) lists that account's objects: an empty page.
    let list = [
        "/v1/checkout/sessions",
        "/v1/invoices",
        "/v1/invoice_payments",
        "/v1/refunds",
        "/v1/credit_notes",
        "/v1/prices",
        "/v1/payment_intents",
    ]
    .contains(&path);
    if let Some((_, status)) =
        s.refused_reads.iter().find(|(prefix, status)| path.starts_with(prefix.as_str()) && !(list && *status == 404))
    {
        return match status {
            401 => error(401, "invalid_request_error", "", "Invalid API Key provided: rk_test_****************cdef"),
            403 => error(
                403,
                "invalid_request_error",
                "",
                "The provided key 'rk_test_****cdef' does not have the required permissions for this endpoint on \
                 account 'acct_1'. Having the 'rak_read' permission would allow this request to continue.",
            ),
            other => error(*other, "invalid_request_error", "resource_missing", "No such object"),
        };
    }
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 10,
        Some(Ok(l)) if (1..=100).contains(&l) => l,
        _ => return invalid("limit must be between 1 and 100"),
    };
    let page = |items: Vec<(String, serde_json::Value)>, url: &str| {
        let start = match q.get("starting_after") {
            Some(after) => match items.iter().position(|(id, _)| id == after) {
                Some(i) => i + 1,
                None => return invalid("starting_after is not an object of this list"),
            },
            None => 0,
        };
        let data: Vec<serde_json::Value> = items.iter().skip(start).take(limit).map(|(_, v)| v.clone()).collect();
        let has_more = items.len() > start + data.len();
        let body = serde_json::json!({ "object": "list", "data": data, "has_more": has_more, "url": url });
        (200, body.to_string(), "application/json")
    };
    if let Some(id) = path.strip_prefix("/v1/prices/") {
        // "Retrieve a price": the price, or 404 `resource_missing`.
        s.price_reads += 1;
        if s.failing_reads > 0 {
            s.failing_reads -= 1;
            return error(500, "api_error", "", "An unknown error occurred");
        }
        return match s.prices.iter().find(|p| p["id"] == id) {
            Some(price) => (200, price.to_string(), "application/json"),
            None => error(404, "invalid_request_error", "resource_missing", &format!("No such price: '{id}'")),
        };
    }
    if path == "/v1/prices" {
        s.price_reads += 1;
        if s.failing_reads > 0 {
            s.failing_reads -= 1;
            return error(500, "api_error", "", "An unknown error occurred");
        }
        // Repeated: not in `q`, which keeps one value per name.
        let keys: Vec<String> = query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .filter(|(k, _)| decode(k) == "lookup_keys[]")
            .map(|(_, v)| decode(v))
            .collect();
        if keys.len() > 10 {
            return invalid("You can specify up to 10 lookup_keys");
        }
        let active = q.get("active").map(String::as_str) != Some("false");
        let items = s
            .prices
            .iter()
            .filter(|p| p["active"] == active)
            .filter(|p| keys.is_empty() || p["lookup_key"].as_str().is_some_and(|k| keys.iter().any(|w| w == k)))
            .map(|p| (p["id"].as_str().unwrap_or_default().to_owned(), p.clone()))
            .collect();
        return page(items, "/v1/prices");
    }
    // The lists themselves ("List all Checkout Sessions", "List all invoices", and the others
    // without their filter, which each reference gives as optional): tollgate asks for one
    // item of each to learn what its key may read. The stand-in keeps no account-wide list:
    // an empty page, as an account without such objects answers.
    if let Some(object) = s.objects.get(path) {
        s.list_reads += 1;
        return (200, object.to_string(), "application/json");
    }
    if path == "/v1/checkout/sessions" && q.contains_key("payment_intent") {
        s.list_reads += 1;
        let intent = &q["payment_intent"];
        let items = s
            .sessions
            .iter()
            .filter(|v| v["payment_intent"].as_str() == Some(intent.as_str()))
            .map(|v| (v["id"].as_str().unwrap_or_default().to_owned(), v.clone()))
            .collect();
        return page(items, path);
    }
    // "List all payments for an invoice" by payment (`payment[type]`, `payment[payment_intent]`:
    // "Only return invoice payments associated by this payment intent ID"): across invoices.
    if path == "/v1/invoice_payments" && !q.contains_key("invoice") && q.contains_key("payment[payment_intent]") {
        if q.get("payment[type]").map(String::as_str) != Some("payment_intent") {
            return invalid("payment[type] is required with payment[payment_intent]");
        }
        s.list_reads += 1;
        let intent = &q["payment[payment_intent]"];
        let items = s
            .invoice_payments
            .values()
            .flatten()
            .filter(|p| p["payment"]["payment_intent"].as_str() == Some(intent.as_str()))
            .map(|p| (p["id"].as_str().unwrap_or_default().to_owned(), p.clone()))
            .collect();
        return page(items, path);
    }
    if path == "/v1/invoices" && q.contains_key("customer") {
        // "List all invoices" of a customer, newest first, `created[gte]` honoured.
        s.list_reads += 1;
        let since = q.get("created[gte]").and_then(|c| c.parse::<i64>().ok()).unwrap_or(i64::MIN);
        let mut items: Vec<(String, serde_json::Value)> = s
            .objects
            .values()
            .filter(|o| o["object"] == "invoice" && o["customer"] == q["customer"].as_str())
            .filter(|o| o["created"].as_i64().unwrap_or(0) >= since)
            .map(|o| (o["id"].as_str().unwrap_or_default().to_owned(), o.clone()))
            .collect();
        items.sort_by_key(|(id, o)| (std::cmp::Reverse(o["created"].as_i64()), id.clone()));
        return page(items, path);
    }
    if ["/v1/checkout/sessions", "/v1/invoices", "/v1/payment_intents"].contains(&path)
        || (path == "/v1/invoice_payments" && !q.contains_key("invoice"))
        || (path == "/v1/refunds" && !q.contains_key("payment_intent"))
        || (path == "/v1/credit_notes" && !q.contains_key("invoice"))
    {
        s.list_reads += 1;
        return page(Vec::new(), path);
    }
    if path.starts_with("/v1/checkout/sessions/")
        || path.starts_with("/v1/invoices/")
        || path == "/v1/invoice_payments"
        || path == "/v1/refunds"
        || path == "/v1/credit_notes"
    {
        s.list_reads += 1;
        if s.failing_reads > 0 {
            s.failing_reads -= 1;
            return error(500, "api_error", "", "An unknown error occurred");
        }
        let (items, url) = if path == "/v1/invoice_payments" {
            let Some(invoice) = q.get("invoice") else { return invalid("invoice is required") };
            (s.invoice_payments.get(invoice).cloned().unwrap_or_default(), path.to_owned())
        } else if path == "/v1/refunds" {
            let Some(intent) = q.get("payment_intent") else { return invalid("payment_intent is required here") };
            (s.refunds.get(intent).cloned().unwrap_or_default(), path.to_owned())
        } else if path == "/v1/credit_notes" {
            let Some(invoice) = q.get("invoice") else { return invalid("invoice is required here") };
            (s.credit_notes.get(invoice).cloned().unwrap_or_default(), path.to_owned())
        } else {
            match s.lists.get(path) {
                Some(items) => (items.clone(), path.to_owned()),
                None => {
                    return error(404, "invalid_request_error", "resource_missing", "No such object");
                }
            }
        };
        let items = items.into_iter().map(|v| (v["id"].as_str().unwrap_or_default().to_owned(), v)).collect();
        return page(items, &url);
    }
    if path == "/v1/billing/meters" {
        let items = meter_ids(s)
            .into_iter()
            .map(|(id, name)| {
                let formula = if s.meters.get(&name).copied().flatten().is_some() { "last" } else { "sum" };
                let meter = serde_json::json!({
                    "created": 1_700_000_000, "customer_mapping": { "event_payload_key": "stripe_customer_id", "type": "by_id" },
                    "default_aggregation": { "formula": formula }, "display_name": name, "event_name": name,
                    "event_time_window": null, "id": id, "livemode": false, "object": "billing.meter",
                    "status": "active", "status_transitions": { "deactivated_at": null }, "updated": 1_700_000_000,
                    "value_settings": { "event_payload_key": "value" },
                });
                (id, meter)
            })
            .collect();
        return page(items, "/v1/billing/meters");
    }
    let Some(id) = path.strip_prefix("/v1/billing/meters/").and_then(|p| p.strip_suffix("/event_summaries")) else {
        return error(404, "invalid_request_error", "resource_missing", "Unrecognized request URL");
    };
    let Some((_, name)) = meter_ids(s).into_iter().find(|(i, _)| i == id) else {
        return error(404, "invalid_request_error", "resource_missing", &format!("No such billing meter: '{id}'"));
    };
    let (Some(customer), Some(start), Some(end)) = (
        q.get("customer"),
        q.get("start_time").and_then(|t| t.parse::<i64>().ok()),
        q.get("end_time").and_then(|t| t.parse::<i64>().ok()),
    ) else {
        return invalid("customer, start_time and end_time are required");
    };
    let hourly = match q.get("value_grouping_window").map(String::as_str) {
        Some("hour") => true,
        None => false,
        Some(_) => return invalid("value_grouping_window must be hour or day"),
    };
    if hourly && (start % 3600 != 0 || end % 3600 != 0) {
        return invalid("For hourly granularity, start_time and end_time must align with hour boundaries");
    }
    // `dimension_group_by_keys[0]=…`, `[1]=…` (the indexed form tollgate sends; a repeated
    // `[]` is read once).
    let group_by: Vec<String> = q
        .iter()
        .filter(|(k, _)| k.strip_prefix("dimension_group_by_keys[").is_some_and(|r| r.ends_with(']')))
        .map(|(_, v)| v.clone())
        .collect();
    let listed = s.dimension_keys.get(&name).cloned().unwrap_or_default();
    if let Some(k) = group_by.iter().find(|k| !listed.contains(k)) {
        return invalid(&format!("`{k}` is not among the dimension_payload_keys of the meter"));
    }
    s.summary_reads += 1;
    let now = s.now();
    let mut hours: BTreeMap<(i64, Vec<String>), i64> = BTreeMap::new();
    for (e, at) in s.events.iter().zip(&s.accepted_at) {
        if e.event_name != name || &e.customer != customer || s.lost.contains(&e.identifier) {
            continue;
        }
        if *at + VISIBLE_AFTER > now || e.timestamp < start || e.timestamp >= end {
            continue;
        }
        let bucket = if hourly { e.timestamp - e.timestamp.rem_euclid(3600) } else { start };
        let dims = s.dimensions.get(&e.identifier);
        let values = group_by.iter().map(|k| dims.and_then(|d| d.get(k)).cloned().unwrap_or_default()).collect();
        *hours.entry((bucket, values)).or_insert(0) += e.value;
    }
    let items = hours
        .into_iter()
        .map(|((h, values), v)| {
            let sid = format!("mtrusg_{h}_{}", values.join("_"));
            let mut summary = serde_json::json!({
                "aggregated_value": v, "end_time": if hourly { h + 3600 } else { end }, "id": sid,
                "livemode": false, "meter": id, "object": "billing.meter_event_summary", "start_time": h,
            });
            if !group_by.is_empty() {
                summary["dimensions"] = group_by
                    .iter()
                    .cloned()
                    .zip(values.into_iter().map(serde_json::Value::String))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            (sid, summary)
        })
        .collect();
    page(items, &format!("/v1/billing/meters/{id}/event_summaries"))
}
