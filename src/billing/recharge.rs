//! Charging a recharge through Stripe (docs/credits.md, "Recharge"): an invoice of the credit
//! price's packs, created with `collection_method = "charge_automatically"`, without the
//! customer's pending items, finalized and paid at once (an auto-advancing invoice would be
//! finalized about an hour later). Every call carries an idempotency key derived from the
//! recharge (tenant, meter, number), so a retried or raced delivery charges once; a claim taken
//! again past Stripe's 24 hours of keys first looks its invoice up by its metadata. The units
//! are granted by `invoice.paid` (the top-up path), never here.

use std::{collections::HashMap, time::Duration};

use sha2::{Digest, Sha256};
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::{
    invoice::{
        CreateInvoice, CreateInvoicePendingInvoiceItemsBehavior, FinalizeInvoiceInvoice, ListInvoice, PayInvoice,
    },
    invoice_item::{CreateInvoiceItem, PricingParam},
    Invoice, InvoiceCollectionMethod, InvoiceStatus,
};

use super::{reader::StripeReader, Secret, StripeSetupError};
use crate::{config::Config, store::RechargeFailure};

/// Past this age of a claim (its first claim), Stripe may have forgotten its idempotency keys
/// (kept 24 hours): its invoice is looked up by its metadata before one is created.
pub(crate) const KEYS_TRUSTED_SECS: i64 = 23 * 3600;

pub(crate) use super::metadata::{ID_KEY, METER_KEY, RECHARGE_KEY, TENANT_KEY};

/// What a recharge's delivery asks of Stripe.
#[derive(Debug, Clone)]
pub(crate) struct Order<'a> {
    /// The deployment's identifier namespace (two deployments on one account never share keys).
    pub(crate) namespace: &'a str,
    pub(crate) customer: &'a str,
    pub(crate) tenant: &'a str,
    pub(crate) meter: &'a str,
    pub(crate) n: u64,
    pub(crate) price: &'a str,
    pub(crate) packs: u64,
    /// The billing currency (`[billing] currency`): the invoice's, whatever the customer's.
    pub(crate) currency: &'a str,
    /// Stripe Tax computes the invoice's tax (the plan's `automatic_tax`).
    pub(crate) automatic_tax: bool,
    /// When it was first claimed (Unix seconds).
    pub(crate) claimed_at: i64,
    /// Its payment was processing when last delivered: its invoice is read, never paid again.
    pub(crate) processing: bool,
    pub(crate) now: i64,
}

impl Order<'_> {
    /// The recharge's identity: the stem of its idempotency keys, and its invoice's metadata.
    pub(crate) fn id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"tollgate recharge\0")
            .chain_update(self.namespace.as_bytes())
            .chain_update(b"\0")
            .chain_update(self.tenant.as_bytes())
            .chain_update(b"\0")
            .chain_update(self.meter.as_bytes())
            .chain_update(b"\0")
            .chain_update(self.n.to_string().as_bytes())
            .finalize();
        format!("tgr_{}", hex::encode(&digest[..16]))
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Charged {
    /// Stripe says the invoice is paid: `invoice.paid` grants it.
    Paid(String),
    /// Stripe took the payment and it is processing (a bank debit: the invoice stays open
    /// until `invoice.paid` or `invoice.payment_failed`, days later).
    Processing(String),
    /// The payment failed, as Stripe said: counted against the tenant's recharge (its invoice,
    /// if one is open: voided once the failure is counted).
    Failed(RechargeFailure, String, Option<String>),
    /// The bank asks for 3-D Secure (`invoice`; why): counted as a failure, and the invoice
    /// left open for the customer to pay at its hosted page (`url`, when it could be read).
    ActionRequired { invoice: String, url: Option<String>, detail: String },
    /// Not known (Stripe unreachable, a server error, a refusal of the key): delivered again
    /// once the claim lapses, under the same keys.
    Retry(String),
}

/// Charges recharges through Stripe with the secret key.
pub struct RechargeCharger {
    client: stripe::Client,
    reader: std::sync::Arc<StripeReader>,
    timeout: Duration,
}

impl std::fmt::Debug for RechargeCharger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RechargeCharger").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl RechargeCharger {
    /// A charger calling Stripe with this secret key; `api_base` replaces
    /// `https://api.stripe.com/` (a local stand-in, a proxy).
    ///
    /// # Errors
    /// The client cannot be built.
    pub fn new(secret_key: &Secret, api_base: Option<&str>, timeout: Duration) -> Result<Self, StripeSetupError> {
        let mut builder = stripe::ClientBuilder::new(secret_key.expose()).timeout(timeout);
        if let Some(base) = api_base {
            builder = builder.url(base);
        }
        let client = builder.build().map_err(|e| StripeSetupError::Client(e.to_string()))?;
        let reader = std::sync::Arc::new(StripeReader::new(secret_key.clone(), api_base, timeout));
        Ok(Self { client, reader, timeout })
    }

    /// A charger with `reader`'s key, base and timeout (the webhook handler's: to void an
    /// invoice whose failure it counted).
    pub(crate) fn of_reader(reader: &std::sync::Arc<StripeReader>) -> Result<Self, StripeSetupError> {
        let (key, base, timeout) = reader.parts();
        let mut builder = stripe::ClientBuilder::new(key.expose()).timeout(timeout);
        builder = builder.url(base);
        let client = builder.build().map_err(|e| StripeSetupError::Client(e.to_string()))?;
        Ok(Self { client, reader: reader.clone(), timeout })
    }

    /// The charger the configuration's `[stripe]` section describes, with the secret key from
    /// `stripe.secret_key_file` or `STRIPE_SECRET_KEY`.
    ///
    /// # Errors
    /// No `[stripe]` section, no secret key, or the client cannot be built.
    pub fn from_config(config: &Config) -> Result<Self, StripeSetupError> {
        let settings = config
            .stripe()
            .ok_or(StripeSetupError::MissingSecret { env: "STRIPE_SECRET_KEY", file_key: "secret_key_file" })?;
        let key = super::read_secrets(settings.secret_key_file.as_deref(), "STRIPE_SECRET_KEY", "secret_key_file")?;
        Self::new(&key[0], settings.api_base.as_deref(), settings.timeout)
    }

    /// Its reader of Stripe's API (the same key).
    pub(crate) fn reader(&self) -> std::sync::Arc<StripeReader> {
        self.reader.clone()
    }

    /// The price's `unit_amount` (smallest unit) and currency, as Stripe says.
    pub(crate) async fn unit_amount(&self, price: &str) -> Result<(u64, String), String> {
        let v = self.reader.get(&format!("v1/prices/{price}")).await.map_err(|e| e.why)?;
        let amount = v["unit_amount"].as_u64().filter(|a| *a > 0).ok_or_else(|| {
            format!("price `{price}` has no unit_amount (a recharge buys a price of a fixed amount per unit)")
        })?;
        Ok((amount, v["currency"].as_str().unwrap_or_default().to_owned()))
    }

    /// The price's amount and currency as a delivery reads it: `Ok(Err(why))` when it can no
    /// longer be charged as counted whatever is tried again (it has no `unit_amount`),
    /// `Err(why)` when it could not be read now (Stripe unreachable, the key refused).
    pub(crate) async fn price_now(&self, price: &str) -> Result<Result<(u64, String), String>, String> {
        match self.reader.get(&format!("v1/prices/{price}")).await {
            Ok(v) => Ok(match v["unit_amount"].as_u64().filter(|a| *a > 0) {
                Some(amount) => Ok((amount, v["currency"].as_str().unwrap_or_default().to_owned())),
                None => Err(format!("price `{price}` has no unit_amount")),
            }),
            // A key refused (rolled, restricted) passes once it is right: tried again, never a
            // reason to turn every tenant's recharge off.
            Err(e) => Err(e.why),
        }
    }

    /// Delivers `order`: its invoice (found by its metadata past [`KEYS_TRUSTED_SECS`], else
    /// created under the recharge's key: two deliveries of one recharge make one invoice), its
    /// item (added to a found draft that lacks it), finalized, paid. Finalizing and paying act
    /// on the invoice's status as Stripe says it, under keys of the delivery's 10-minute
    /// window (an invoice is paid at most once whatever the key; a failure Stripe saved under
    /// one key is not replayed to the next delivery).
    pub(crate) async fn charge(&self, order: &Order<'_>) -> Charged {
        let id = order.id();
        let window = order.now.div_euclid(crate::store::CLAIM_TAKEN_SECS);
        let key = |step: &str| IdempotencyKey::new(format!("{id}-{step}")).map(RequestStrategy::Idempotent);
        let Ok(k) = key("invoice") else { return Charged::Retry("an idempotency key that Stripe refuses".into()) };
        let found = if order.now - order.claimed_at > KEYS_TRUSTED_SECS {
            match self.find(order, &id).await {
                Ok(found) => found,
                Err(why) => return Charged::Retry(why),
            }
        } else {
            None
        };
        let (invoice, item_key) = match found {
            Some(invoice) => (invoice, "item-late"),
            // A processing payment's invoice not found by its metadata: never made again.
            None if order.processing && order.now - order.claimed_at > KEYS_TRUSTED_SECS => {
                return Charged::Retry(format!(
                    "the invoice of recharge {}, whose payment processes, was not found",
                    order.n
                ));
            }
            None => {
                let metadata: HashMap<String, String> = [
                    (RECHARGE_KEY.to_owned(), order.n.to_string()),
                    (METER_KEY.to_owned(), order.meter.to_owned()),
                    (TENANT_KEY.to_owned(), order.tenant.to_owned()),
                    (ID_KEY.to_owned(), id.clone()),
                ]
                .into_iter()
                .collect();
                let mut create = CreateInvoice::new()
                    .customer(order.customer)
                    .collection_method(InvoiceCollectionMethod::ChargeAutomatically)
                    .pending_invoice_items_behavior(CreateInvoicePendingInvoiceItemsBehavior::Exclude)
                    .auto_advance(false)
                    .metadata(metadata);
                // The billing currency, as the limit counts it (Stripe would take the
                // customer's otherwise).
                if order.automatic_tax {
                    create = create.automatic_tax(stripe_billing::invoice::CreateInvoiceAutomaticTax::new(true));
                }
                if !order.currency.is_empty() {
                    let Ok(currency) = order.currency.parse::<stripe_types::Currency>();
                    create = create.currency(currency);
                }
                match create.customize().request_strategy(k).timeout(self.timeout).send(&self.client).await {
                    Ok(invoice) => (invoice, "item"),
                    Err(e) => return Self::failed(e),
                }
            }
        };
        let Some(invoice_id) = invoice.id.clone() else { return Charged::Retry("an invoice without an id".into()) };
        let mut status = invoice.status.clone();
        let mut attempted = invoice.attempted;
        if order.processing {
            return self.after_processing(invoice_id.as_str(), status).await;
        }
        // A draft without its item (a node died between the two calls): the item, once.
        if status == Some(InvoiceStatus::Draft) && (item_key == "item" || invoice.lines.data.is_empty()) {
            let mut pricing = PricingParam::new();
            pricing.price = Some(order.price.to_owned());
            let item = CreateInvoiceItem::new()
                .customer(order.customer)
                .invoice(invoice_id.as_str())
                .pricing(pricing)
                .quantity(order.packs);
            let Ok(k) = key(item_key) else { return Charged::Retry("an idempotency key that Stripe refuses".into()) };
            if let Err(e) = item.customize().request_strategy(k).timeout(self.timeout).send(&self.client).await {
                return Self::failed(e);
            }
        }
        if status == Some(InvoiceStatus::Draft) {
            let Ok(k) = key(&format!("finalize-{window}")) else {
                return Charged::Retry("an idempotency key that Stripe refuses".into());
            };
            let finalize = FinalizeInvoiceInvoice::new(invoice_id.clone()).customize().request_strategy(k);
            (status, attempted) = match finalize.timeout(self.timeout).send(&self.client).await {
                Ok(finalized) => (finalized.status, finalized.attempted),
                // Finalized meanwhile (another delivery): as Stripe says it now.
                Err(StripeError::Stripe(_, 400)) => match self.status(invoice_id.as_str()).await {
                    Ok(now) => now,
                    Err(why) => return Charged::Retry(why),
                },
                Err(e) => return Self::failed(e),
            };
        }
        match status {
            // Paid by the customer's credit balance at finalization, or earlier.
            Some(InvoiceStatus::Paid) => return Charged::Paid(invoice_id.to_string()),
            Some(InvoiceStatus::Void | InvoiceStatus::Uncollectible) => {
                return Charged::Failed(RechargeFailure::Refused, format!("invoice {invoice_id} is {status:?}"), None)
            }
            Some(InvoiceStatus::Open) => {}
            // Still a draft: Stripe refused to finalize it.
            Some(InvoiceStatus::Draft) => {
                return Charged::Failed(RechargeFailure::Refused, format!("invoice {invoice_id} stays a draft"), None)
            }
            other => return Charged::Retry(format!("invoice {invoice_id} is {other:?}")),
        }
        // Attempted before (a delivery whose answer was lost, or whose mark in the store
        // failed): a payment that is processing is never paid again.
        if attempted {
            match self.payment_processing(invoice_id.as_str()).await {
                Ok(true) => return Charged::Processing(invoice_id.to_string()),
                Ok(false) => {}
                Err(why) => return Charged::Retry(why),
            }
        }
        let Ok(k) = key(&format!("pay-{window}")) else {
            return Charged::Retry("an idempotency key that Stripe refuses".into());
        };
        let pay = PayInvoice::new(invoice_id.clone()).off_session(true).customize().request_strategy(k);
        match pay.timeout(self.timeout).send(&self.client).await {
            Ok(paid) if paid.status == Some(InvoiceStatus::Paid) => Charged::Paid(invoice_id.to_string()),
            // Taken, not paid yet: a delayed payment method (a bank debit) is processing.
            Ok(paid) if paid.status == Some(InvoiceStatus::Open) => Charged::Processing(invoice_id.to_string()),
            Ok(paid) => Charged::Retry(format!("invoice {invoice_id} is {:?} after its payment", paid.status)),
            // Paid meanwhile (another delivery, the customer)?
            Err(e @ StripeError::Stripe(_, 400)) => match self.status(invoice_id.as_str()).await {
                Ok((Some(InvoiceStatus::Paid), _)) => Charged::Paid(invoice_id.to_string()),
                // Refused while another delivery's payment processes: pending, not failed.
                Ok(_) => match self.payment_processing(invoice_id.as_str()).await {
                    Ok(true) => Charged::Processing(invoice_id.to_string()),
                    Ok(false) => self.refused(e, invoice_id.as_str()).await,
                    Err(why) => Charged::Retry(why),
                },
                Err(why) => Charged::Retry(why),
            },
            Err(e) => self.refused(e, invoice_id.as_str()).await,
        }
    }

    /// `invoice`'s payment refused as Stripe answered it: 3-D Secure asked for leaves the
    /// invoice open for the customer, with its hosted page (read from the invoice: the `pay`
    /// error does not carry it); any other refusal, or a page that could not be read, names
    /// the invoice, to void once counted (an invoice nobody is shown is never left open).
    async fn refused(&self, e: StripeError, invoice: &str) -> Charged {
        match Self::failed(e) {
            Charged::Failed(RechargeFailure::ActionRequired, detail, _) => {
                let url = match self.reader.get(&format!("v1/invoices/{invoice}")).await {
                    Ok(v) => v["hosted_invoice_url"].as_str().map(str::to_owned),
                    Err(e) => {
                        tracing::warn!(%invoice, error = %e.why, "a recharge's invoice page could not be read: voided");
                        None
                    }
                };
                match url.filter(|u| crate::store::RechargeAction::new(0, u, 0).is_some()) {
                    Some(url) => Charged::ActionRequired { invoice: invoice.to_owned(), url: Some(url), detail },
                    None => Charged::Failed(RechargeFailure::ActionRequired, detail, Some(invoice.to_owned())),
                }
            }
            other => other.on(invoice),
        }
    }

    /// Whether `invoice`'s payment waits for the customer's authentication (3-D Secure): an
    /// open invoice payment whose payment intent is `requires_action` (API reference, "The
    /// PaymentIntent object": `status`). `Err`: it could not be read.
    pub(crate) async fn payment_requires_action(&self, invoice: &str) -> Result<bool, String> {
        let page =
            self.reader.get(&format!("v1/invoice_payments?invoice={invoice}&limit=10")).await.map_err(|e| e.why)?;
        for p in page["data"].as_array().into_iter().flatten().filter(|p| p["status"] == "open") {
            let Some(intent) = p["payment"]["payment_intent"].as_str() else { continue };
            if !intent.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let v = self.reader.get(&format!("v1/payment_intents/{intent}")).await.map_err(|e| e.why)?;
            if v["status"] == "requires_action" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A recharge whose payment was processing, taken again once [`PROCESSING_SECS`]
    /// (crate::store::PROCESSING_SECS) passed without `invoice.paid` nor
    /// `invoice.payment_failed`: paid, it is paid; still open, its debit never cleared (or its
    /// failure was not told): a failure, its invoice voided (Stripe refuses to void one whose
    /// payment still processes). Never paid again.
    async fn after_processing(&self, invoice: &str, status: Option<InvoiceStatus>) -> Charged {
        match status {
            Some(InvoiceStatus::Paid) => Charged::Paid(invoice.to_owned()),
            // Still processing (a slow debit): it waits again, never paid again.
            Some(InvoiceStatus::Open) => match self.payment_processing(invoice).await {
                Ok(true) => Charged::Processing(invoice.to_owned()),
                Ok(false) => Charged::Failed(
                    RechargeFailure::Declined,
                    format!("invoice {invoice}'s payment did not clear in 21 days"),
                    Some(invoice.to_owned()),
                ),
                Err(why) => Charged::Retry(why),
            },
            other => Charged::Failed(RechargeFailure::Refused, format!("invoice {invoice} is {other:?}"), None),
        }
    }

    /// The invoice's status as Stripe says it now.
    async fn status(&self, invoice: &str) -> Result<(Option<InvoiceStatus>, bool), String> {
        let v = self.reader.get(&format!("v1/invoices/{invoice}")).await.map_err(|e| e.why)?;
        Ok((v["status"].as_str().and_then(|s| s.parse().ok()), v["attempted"] == true))
    }

    /// Whether a payment of `invoice` is processing (a bank debit under way): an `open`
    /// invoice payment whose payment intent is `processing` (Stripe's API reference, "Invoice
    /// Payment" and "The PaymentIntent object": `status` `processing`).
    async fn payment_processing(&self, invoice: &str) -> Result<bool, String> {
        // A key that may not read them (PaymentIntents: read, which `tollgate check` asks
        // for): read as not processing, as before this check, and logged; Stripe still refuses
        // to pay an invoice whose payment processes.
        let refused = |e: super::reader::ReadError| -> Result<bool, String> {
            if e.refused.is_some() {
                tracing::error!(%invoice, error = %e.why,
                    "whether a recharge's payment is processing could not be read: the key lacks a permission");
                Ok(false)
            } else {
                Err(e.why)
            }
        };
        let page = match self.reader.get(&format!("v1/invoice_payments?invoice={invoice}&limit=10")).await {
            Ok(page) => page,
            Err(e) => return refused(e),
        };
        for p in page["data"].as_array().into_iter().flatten().filter(|p| p["status"] == "open") {
            let Some(intent) = p["payment"]["payment_intent"].as_str() else { continue };
            if !intent.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let v = match self.reader.get(&format!("v1/payment_intents/{intent}")).await {
                Ok(v) => v,
                Err(e) => return refused(e),
            };
            if v["status"] == "processing" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Voids the invoice of a recharge whose payment failed (counted), so that the customer
    /// never pays it later beside the next recharge of the same crossing. An invoice paid
    /// meanwhile is left paid (its `invoice.paid` grants it). Best effort: logged.
    pub(crate) async fn void(&self, invoice: &str) {
        let key = IdempotencyKey::new(format!("{invoice}-void")).map(RequestStrategy::Idempotent);
        let Ok(key) = key else { return };
        let void = stripe_billing::invoice::VoidInvoiceInvoice::new(invoice).customize().request_strategy(key);
        if let Err(e) = void.timeout(self.timeout).send(&self.client).await {
            tracing::warn!(%invoice, error = %e, "a failed recharge's invoice could not be voided");
        }
    }

    /// The recharge's invoice, if one was created (by its metadata, among the customer's
    /// invoices created since its claim).
    async fn find(&self, order: &Order<'_>, id: &str) -> Result<Option<Invoice>, String> {
        let mut after: Option<String> = None;
        for _ in 0..10 {
            // Newest first: those created before the claim end the search.
            let mut list = ListInvoice::new().customer(order.customer).limit(100);
            if let Some(a) = &after {
                list = list.starting_after(a.as_str());
            }
            let page = list.customize().timeout(self.timeout).send(&self.client).await.map_err(|e| e.to_string())?;
            let since = order.claimed_at.saturating_sub(3600);
            let mine = |i: &&Invoice| i.metadata.as_ref().and_then(|m| m.get(ID_KEY)).is_some_and(|v| v == id);
            if let Some(found) = page.data.iter().take_while(|i| i.created >= since).find(mine) {
                return Ok(Some(found.clone()));
            }
            match page.data.last() {
                Some(last) if page.has_more && last.created >= since => {
                    after = last.id.as_ref().map(ToString::to_string);
                }
                _ => return Ok(None),
            }
        }
        Err("too many invoices to look the recharge's up".into())
    }

    /// A failure as Stripe answered it: a payment refused (counted), or not known (retried).
    fn failed(e: StripeError) -> Charged {
        match &e {
            StripeError::Stripe(err, status) => {
                let code = err.code.as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default();
                let decline = err.decline_code.clone().unwrap_or_default();
                let message = err.message.clone().unwrap_or_default();
                let detail = format!("{status} {code} {decline}: {message}");
                let action = ["invoice_payment_intent_requires_action", "authentication_required"];
                match *status {
                    // 3-D Secure: an automatic charge cannot give it.
                    402 | 400 if action.contains(&code.as_str()) || action.contains(&decline.as_str()) => {
                        Charged::Failed(RechargeFailure::ActionRequired, detail, None)
                    }
                    402 => Charged::Failed(RechargeFailure::Declined, detail, None),
                    400 if message.contains("no attached payment source or default payment method") => {
                        Charged::Failed(RechargeFailure::NoPaymentMethod, detail, None)
                    }
                    // Stripe refused the request itself (a price archived, a customer deleted,
                    // a currency it cannot charge): sending it again changes nothing, so it
                    // counts, and three in a row turn recharge off rather than keeping a claim
                    // open for good.
                    400 | 404 if err.type_ == stripe::ApiErrorsType::InvalidRequestError => {
                        Charged::Failed(RechargeFailure::Refused, detail, None)
                    }
                    // Not a refusal of the request: a lock or a rate limit, a server error, the
                    // key refused (it passes once it is right), a key reused with other
                    // parameters (`idempotency_error`): tried again, never counted.
                    _ => Charged::Retry(detail),
                }
            }
            _ => Charged::Retry(e.to_string()),
        }
    }
}

impl Charged {
    /// A failure of `invoice`'s payment: its invoice named (to void once counted).
    fn on(self, invoice: &str) -> Self {
        match self {
            Charged::Failed(why, detail, None) => Charged::Failed(why, detail, Some(invoice.to_owned())),
            other => other,
        }
    }
}

/// A recharge named by an invoice's metadata: its tenant (the customer's, as the directory
/// says: the metadata must agree), meter and number.
pub(crate) struct Named {
    pub(crate) tenant: crate::base::TenantId,
    pub(crate) meter: crate::base::MeterId,
    pub(crate) n: u64,
}

impl super::WebhookHandler {
    /// The recharge the invoice of an event names (`data.object.metadata`), if it is one of
    /// the customer's tenant.
    async fn recharge_of(
        &self,
        config: &Config,
        body: &serde_json::Value,
    ) -> Result<Option<Named>, crate::store::StoreError> {
        let o = &body["data"]["object"];
        let m = &o["metadata"];
        let (Some(n), Some(meter), Some(tenant), Some(customer)) = (
            m[RECHARGE_KEY].as_str().and_then(|n| n.parse::<u64>().ok()),
            m[METER_KEY].as_str(),
            m[TENANT_KEY].as_str(),
            o["customer"].as_str(),
        ) else {
            return Ok(None);
        };
        let owner = self.tenant_of(config, customer).await?;
        if owner.as_ref().map(crate::base::TenantId::as_str) != Some(tenant) {
            tracing::warn!(%customer, tenant, "a recharge's invoice whose customer is not its tenant's: ignored");
            return Ok(None);
        }
        Ok(owner.map(|tenant| Named { tenant, meter: meter.into(), n }))
    }

    /// `invoice.paid` of a recharge's invoice: its recharge is closed, paid (once; a
    /// redelivery closes nothing more), and, when its units are granted (now or before:
    /// `granted`), the engine told, which writes its `balance.recharged` alert. `Err`: the
    /// answer (the store failed, or the alert could not be written: 500).
    pub(super) async fn recharge_paid(
        &self,
        config: &Config,
        body: &serde_json::Value,
        granted: bool,
    ) -> Result<(), super::WebhookOutcome> {
        use crate::store::QuotaStoreExt as _;
        let failed = |e: crate::store::StoreError| super::WebhookOutcome::StoreFailed(e.to_string());
        let Some(named) = self.recharge_of(config, body).await.map_err(failed)? else { return Ok(()) };
        let Some(quota) = &self.quota else { return Ok(()) };
        let now = self.clock.unix_secs();
        let seen = quota
            .apply_recharge(&named.tenant, &named.meter, crate::store::RechargeMode::Paid { n: named.n }, now)
            .await
            .map_err(failed)?;
        // Told whenever it is paid, first or again (its alert's id names the recharge: written
        // once), so that a delivery answered 500 for want of its alert carries it next time.
        if let (crate::store::RechargeSeen::Paid { n, first }, true) = (seen, granted) {
            let o = &body["data"]["object"];
            let news = crate::base::RechargeNews::Paid {
                tenant: named.tenant,
                meter: named.meter,
                n,
                invoice: o["id"].as_str().unwrap_or_default().to_owned(),
                amount_paid: o["amount_paid"].as_u64().unwrap_or(0),
                currency: o["currency"].as_str().unwrap_or_default().to_owned(),
                first,
            };
            self.node.recharge(news).await.map_err(super::WebhookOutcome::StoreFailed)?;
        }
        Ok(())
    }

    /// A recharge's invoice found paid by its delivery, `invoice.paid` never having come (the
    /// endpoint not subscribed to it, or down past Stripe's 3 days): read from Stripe and
    /// handled as its `invoice.paid` would be, through the top-up path (its grant's id is the
    /// invoice's, so the event, if it comes after all, is a duplicate), closing the recharge.
    /// `None`: the configuration sells no credits, or the invoice was paid within
    /// [`CREDIT_UNANNOUNCED_SECS`](crate::store::CREDIT_UNANNOUNCED_SECS) (its event may be on
    /// its way).
    pub(crate) async fn credit_paid_recharge(&self, invoice: &str) -> Option<super::WebhookOutcome> {
        let config = self.config_now();
        let credits = config.stripe()?.credits.as_ref()?;
        let reader = self.reader.as_ref()?;
        let object = match reader.get(&format!("v1/invoices/{invoice}")).await {
            Ok(object) => object,
            Err(e) => return Some(super::WebhookOutcome::ApiFailed(e.why)),
        };
        let now = self.clock.unix_secs();
        // Paid within the hour (the claim waited on a Stripe outage): its event may be on its
        // way; credited only once it is late.
        let paid_at = object["status_transitions"]["paid_at"].as_i64().unwrap_or(0);
        if now.saturating_sub(paid_at) < crate::store::CREDIT_UNANNOUNCED_SECS {
            return None;
        }
        let event = format!("tollgate_delivery_{invoice}");
        let payload = serde_json::json!({
            "id": event, "object": "event", "type": "invoice.paid", "created": now, "data": { "object": object },
        })
        .to_string();
        self.payment_event(&config, credits, &event, "invoice.paid", &payload).await
    }

    /// A paid recharge whose units could not be granted (`why`, logged): recharge `n` of
    /// `tenant` on `meter` turned off at once ([`RechargeFailure::GrantRefused`]), its alert
    /// written (once). Never closed as paid. `Err`: the answer (the store failed: 500).
    pub(super) async fn recharge_refused(
        &self,
        tenant: &crate::base::TenantId,
        meter: &crate::base::MeterId,
        n: u64,
        why: &str,
    ) -> Result<(), super::WebhookOutcome> {
        tracing::error!(%tenant, %meter, n, why,
            "a paid recharge could not be credited: recharge turned off (grant_refused); grant by hand, free room or refund");
        self.recharge_refused_as(tenant, meter, n, RechargeFailure::GrantRefused, why).await
    }

    /// Recharge `n` of `tenant` on `meter` turned off at once for `reason` (`why`, logged),
    /// its alert written once. `Err`: the answer (the store failed: 500).
    async fn recharge_refused_as(
        &self,
        tenant: &crate::base::TenantId,
        meter: &crate::base::MeterId,
        n: u64,
        reason: RechargeFailure,
        why: &str,
    ) -> Result<(), super::WebhookOutcome> {
        use crate::store::QuotaStoreExt as _;
        let Some(quota) = &self.quota else { return Ok(()) };
        tracing::warn!(%tenant, %meter, n, reason = reason.as_str(), why, "recharge turned off");
        let now = self.clock.unix_secs();
        let mode = crate::store::RechargeMode::Stop { n, why: reason };
        let seen = quota
            .apply_recharge(tenant, meter, mode, now)
            .await
            .map_err(|e| super::WebhookOutcome::StoreFailed(e.to_string()))?;
        if let crate::store::RechargeSeen::Failed { off, first, why: kept, .. } = seen {
            let news = crate::base::RechargeNews::Failed {
                tenant: tenant.clone(),
                meter: meter.clone(),
                n,
                reason: kept.as_str(),
                off,
                first,
            };
            self.node.recharge(news).await.map_err(super::WebhookOutcome::StoreFailed)?;
        }
        Ok(())
    }

    /// A refund or a dispute (`why`) took units of `grant`, on `tenant`'s `meter`: when the
    /// grant is a recharge's (its id an invoice whose metadata names the recharge), recharge
    /// is turned off at once, with one alert, so that the card is not charged again by the
    /// next request. An invoice that cannot be read turns it off all the same, if it is on
    /// (the card is not charged again until someone looks). Best effort: logged.
    pub(super) async fn recharge_reversed(
        &self,
        tenant: &crate::base::TenantId,
        meter: &crate::base::MeterId,
        grant: &str,
        why: RechargeFailure,
    ) {
        let Some(quota) = &self.quota else { return };
        let n = match (&self.reader, grant.starts_with("in_")) {
            (Some(reader), true) => match reader.get(&format!("v1/invoices/{grant}")).await {
                Ok(invoice) => {
                    let m = &invoice["metadata"];
                    let ours = m[TENANT_KEY].as_str() == Some(tenant.as_str())
                        && m[METER_KEY].as_str() == Some(meter.as_str());
                    match m[RECHARGE_KEY].as_str().and_then(|n| n.parse::<u64>().ok()) {
                        Some(n) if ours => Some(n),
                        _ => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(%tenant, %meter, %grant, error = %e.why,
                        "a reversed payment's invoice could not be read: the tenant's recharge is turned off if on");
                    None
                }
            },
            // Not an invoice's grant: not a recharge.
            (_, false) => return,
            (None, true) => None,
        };
        let n = match n {
            Some(n) => n,
            None => match quota.counters(tenant, meter).await {
                Ok(counters) => match counters.into_iter().find_map(|c| c.recharge) {
                    Some(state) if state.on() => state.n,
                    _ => return,
                },
                Err(e) => {
                    tracing::error!(%tenant, %meter, %grant, error = %e, "a reversed payment's recharge could not be read");
                    return;
                }
            },
        };
        if let Err(e) = self.recharge_refused_as(tenant, meter, n, why, "its payment was reversed").await {
            tracing::error!(%tenant, %meter, n, reason = why.as_str(), outcome = ?e,
                "a reversed recharge could not turn recharge off");
        }
    }

    /// Under `refunds = "ignore"` (no units are taken back): a refund or a dispute (`why`) of
    /// a recharge's payment still turns recharge off at once, with one alert, so that the card
    /// the customer asked their money back from is not charged again. The payment's invoice
    /// (`invoice`, else the one the payment intent paid, read from its invoice payments) names
    /// the recharge by its metadata, and its customer the tenant. Needs the secret key; what
    /// cannot be read now is answered `Err` (500: Stripe delivers it again).
    pub(super) async fn recharge_reversed_ignoring(
        &self,
        config: &Config,
        intent: Option<&str>,
        invoice: Option<&str>,
        why: RechargeFailure,
    ) -> Result<(), super::WebhookOutcome> {
        let Some(reader) = &self.reader else { return Ok(()) };
        // Unread now: answered 500, so that Stripe delivers it again; refused to the key (it
        // lacks a permission: every refund would be delivered again for days), logged.
        let unread = |e: super::reader::ReadError| -> Result<(), super::WebhookOutcome> {
            if e.refused.is_some() {
                tracing::error!(error = %e.why,
                    "a reversed payment's invoice could not be read (the key lacks a permission): its recharge, if any, stays on");
                return Ok(());
            }
            tracing::warn!(error = %e.why, "a reversed payment's invoice could not be read: delivered again");
            Err(super::WebhookOutcome::ApiFailed(e.why))
        };
        let invoice = match (invoice, intent) {
            (Some(invoice), _) => Some(invoice.to_owned()),
            (None, Some(intent)) => match super::topup::invoice_of_payment(reader, intent).await {
                Ok(found) => found,
                Err(e) => return unread(e),
            },
            (None, None) => None,
        };
        let ours = |i: &String| i.starts_with("in_") && i.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let Some(invoice) = invoice.filter(ours) else { return Ok(()) };
        let object = match reader.get(&format!("v1/invoices/{invoice}")).await {
            Ok(object) => object,
            Err(e) => return unread(e),
        };
        let body = serde_json::json!({ "data": { "object": object } });
        let failed = |e: crate::store::StoreError| super::WebhookOutcome::StoreFailed(e.to_string());
        let Some(named) = self.recharge_of(config, &body).await.map_err(failed)? else { return Ok(()) };
        self.recharge_refused_as(&named.tenant, &named.meter, named.n, why, "its payment was reversed").await
    }

    /// A recharge's paid invoice that granted nothing under this configuration (`outcome`):
    /// its recharge is turned off ([`recharge_refused`](Self::recharge_refused)), never closed
    /// as paid. `Ok(false)`: not a recharge's invoice.
    pub(super) async fn recharge_not_credited(
        &self,
        config: &Config,
        body: &serde_json::Value,
        outcome: &super::WebhookOutcome,
    ) -> Result<bool, super::WebhookOutcome> {
        let failed = |e: crate::store::StoreError| super::WebhookOutcome::StoreFailed(e.to_string());
        let Some(named) = self.recharge_of(config, body).await.map_err(failed)? else { return Ok(false) };
        let why = format!("its paid invoice granted nothing ({outcome:?})");
        self.recharge_refused(&named.tenant, &named.meter, named.n, &why).await?;
        Ok(true)
    }

    /// `invoice.payment_failed` or `invoice.payment_action_required` of a recharge's invoice:
    /// one failure of its recharge (once per recharge, whoever counts it first: this event or
    /// the worker's pay call). Another invoice's: not a payment event (`None`).
    pub(super) async fn recharge_failed(
        &self,
        config: &Config,
        event: &str,
        kind: &str,
        payload: &str,
    ) -> Option<super::WebhookOutcome> {
        use crate::store::QuotaStoreExt as _;
        let body: serde_json::Value = serde_json::from_str(payload).ok()?;
        let named = match self.recharge_of(config, &body).await {
            Ok(named) => named?,
            Err(e) => return Some(super::WebhookOutcome::StoreFailed(e.to_string())),
        };
        let quota = self.quota.as_ref()?;
        let object = &body["data"]["object"];
        let mut why = if kind == "invoice.payment_action_required" {
            RechargeFailure::ActionRequired
        } else {
            RechargeFailure::Declined
        };
        // A failure that waits for the customer's authentication (its payment intent
        // `requires_action`), whichever event tells it: never voided.
        if why == RechargeFailure::Declined {
            if let (Some(reader), Some(invoice)) = (&self.reader, object["id"].as_str()) {
                // At most 3 s of the 10 Stripe waits for the answer.
                let asks = match RechargeCharger::of_reader(reader) {
                    Ok(charger) => {
                        let read = charger.payment_requires_action(invoice);
                        tokio::time::timeout(Duration::from_secs(3), read)
                            .await
                            .unwrap_or_else(|_| Err("no answer within 3 s".into()))
                    }
                    Err(e) => Err(e.to_string()),
                };
                match asks {
                    Ok(true) => why = RechargeFailure::ActionRequired,
                    Ok(false) => {}
                    // Unread (a key without the permission, Stripe unreachable): a decline, as
                    // before this read.
                    Err(e) => tracing::warn!(%event, error = %e,
                        "whether a failed recharge payment waits for authentication could not be read"),
                }
            }
        }
        let now = self.clock.unix_secs();
        let url = object["hosted_invoice_url"]
            .as_str()
            .filter(|u| why == RechargeFailure::ActionRequired && crate::store::RechargeAction::new(0, u, 0).is_some());
        let mode = match url {
            // Left open for the customer to pay on its page.
            Some(url) => crate::store::RechargeMode::ActionRequired { n: named.n, url: url.to_owned(), now },
            None => crate::store::RechargeMode::Failed { n: named.n, why, now },
        };
        match quota.apply_recharge(&named.tenant, &named.meter, mode, now).await {
            Ok(crate::store::RechargeSeen::Failed { off, first, why: kept, .. }) => {
                tracing::warn!(%event, tenant = %named.tenant, meter = %named.meter, n = named.n, reason = why.as_str(), off,
                    "a recharge's payment failed");
                // Counted here first (the paying node died, its pay call timed out, or a bank
                // debit failed days later): its invoice voided, so that the customer never
                // pays it later beside the next recharge of the same crossing.
                // (A 3-D Secure failure without a page to show is voided too.)
                let void = why == RechargeFailure::Declined || url.is_none();
                if let (true, true, Some(reader), Some(invoice)) =
                    (first, void, &self.reader, body["data"]["object"]["id"].as_str())
                {
                    match RechargeCharger::of_reader(reader) {
                        Ok(charger) => charger.void(invoice).await,
                        Err(e) => {
                            tracing::warn!(%invoice, error = %e, "a failed recharge's invoice could not be voided")
                        }
                    }
                }
                let news = crate::base::RechargeNews::Failed {
                    tenant: named.tenant.clone(),
                    meter: named.meter.clone(),
                    n: named.n,
                    reason: kept.as_str(),
                    off,
                    first,
                };
                if let Err(e) = self.node.recharge(news).await {
                    return Some(super::WebhookOutcome::StoreFailed(e));
                }
                if let (true, Some(url), Some(invoice)) = (first, url, object["id"].as_str()) {
                    let news = crate::base::RechargeNews::ActionRequired {
                        tenant: named.tenant.clone(),
                        meter: named.meter.clone(),
                        n: named.n,
                        invoice: invoice.to_owned(),
                        url: url.to_owned(),
                    };
                    if let Err(e) = self.node.recharge(news).await {
                        return Some(super::WebhookOutcome::StoreFailed(e));
                    }
                }
                Some(super::WebhookOutcome::RechargeFailed {
                    tenant: named.tenant,
                    meter: named.meter,
                    n: named.n,
                    off,
                })
            }
            // Not open (paid, or counted and answered before): nothing more.
            Ok(_) => Some(super::WebhookOutcome::Duplicate),
            Err(e) => Some(super::WebhookOutcome::StoreFailed(e.to_string())),
        }
    }
}
