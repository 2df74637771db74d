//! Delivering a claimed recharge: the worker charges it through Stripe, once per claim on this
//! node, under keys derived from the recharge (a claim taken again by another node charges
//! under the same keys). A payment refused counts a failure in the store
//! ([`RechargeMode::Failed`](crate::store::RechargeMode::Failed)); a paid one is closed by its
//! `invoice.paid`, which grants the units.

use super::queue::Claimed;
use crate::{
    config::RechargeSpec,
    settings::plan::{served_tenant, Unserved},
    store::{RechargeClaim, RechargeFailure, RechargeMode, RechargeSeen, RechargeSetting, RechargeState, StoreError},
};

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Stripe says paid: `invoice.paid` grants it (the invoice; when the claim was made).
    #[cfg_attr(not(feature = "stripe"), allow(dead_code))]
    Paid { invoice: String, claimed_at: i64 },
    /// Its payment is processing (a bank debit): the claim waits for `invoice.paid` or
    /// `invoice.payment_failed`, marked in the store.
    #[cfg_attr(not(feature = "stripe"), allow(dead_code))]
    Processing,
    /// The payment failed: counted (`off`: recharge is off since; `first`: counted by this
    /// delivery, not before by the invoice's webhook). With `action`, the bank asked for 3-D
    /// Secure: the invoice (`invoice`, `url` its hosted page) is left open for the customer.
    Failed { why: RechargeFailure, off: bool, first: bool, action: Option<(String, String)> },
    /// No longer open in the store (paid, failed or dropped meanwhile): nothing charged.
    Closed,
    /// Not known: delivered again once the claim lapses.
    Retry(String),
}

/// What a delivery uses.
pub(crate) struct Parts<'a> {
    pub(crate) quota: &'a dyn crate::store::QuotaStore,
    pub(crate) directory: &'a dyn crate::store::DirectoryStore,
    pub(crate) usage: &'a dyn crate::store::UsageExportStore,
    pub(crate) config: &'a crate::config::Config,
    pub(crate) charger: Option<&'a crate::billing::Charger>,
    pub(crate) now: i64,
}

/// Delivers `claim`.
pub(crate) async fn deliver(parts: &Parts<'_>, claim: &Claimed) -> Delivered {
    match attempt(parts, claim).await {
        Ok(d) => d,
        Err(e) => Delivered::Retry(e.to_string()),
    }
}

async fn attempt(parts: &Parts<'_>, claim: &Claimed) -> Result<Delivered, StoreError> {
    // Still open, as claimed: a claim paid, failed or dropped meanwhile is never charged.
    let state = parts.quota.counters(&claim.tenant, &claim.meter).await?.into_iter().find_map(|c| c.recharge);
    let Some(open) = state.as_ref().and_then(|s| s.open).filter(|o| o.n == claim.n) else {
        return Ok(Delivered::Closed);
    };
    // Turned off since it was claimed: never charged (it stays open and counted until it is
    // wanted again, its payment is told, or `UNWANTED_CLAIM_SECS` pass).
    let Some(setting) = state.filter(RechargeState::on).and_then(|s| s.setting) else { return Ok(Delivered::Closed) };
    let (record, spec) = match served_tenant(parts.directory, parts.config, &claim.tenant).await? {
        Ok((record, served)) => (Some(record), served.spec.recharge(&claim.meter).cloned()),
        Err(Unserved::UnknownTenant | Unserved::UnknownPlan(_)) => (None, None),
        // The engine refuses the tenant until its overrides are mended: nothing is charged
        // meanwhile, and the claim is delivered again once it lapses.
        Err(Unserved::Unreadable(why)) => {
            return Ok(Delivered::Retry(format!("the tenant's plan is not served: {why}")))
        }
    };
    let Some(spec) = spec else {
        // Moved to a plan that recharges nothing: never charged, and recharge turned off (not a
        // failure of the card's); the claim closes unpaid past `UNWANTED_CLAIM_SECS`, if the tenant ever
        // comes back to a plan that recharges.
        use crate::store::QuotaStoreExt as _;
        parts.quota.apply_recharge(&claim.tenant, &claim.meter, RechargeMode::Set(None), parts.now).await?;
        return Ok(Delivered::Closed);
    };
    // The claim counted packs of the setting's price, at the setting's amount: charged only
    // while the plan still recharges that price, in packs of those units.
    // A payment already processing is only read: never stopped as "not charged" while its
    // debit is in flight.
    if let Some(why) = pack_changed(&setting, &spec, &open).filter(|_| !open.processing) {
        return stop(parts, claim, RechargeFailure::PriceChanged, &why).await;
    }
    // The customer as the configuration file declares it, else as the directory says (a file
    // tenant's customer may be set in the directory alone).
    let customer = match record.and_then(|t| t.customer) {
        Some(c) => Some(c),
        None => parts.directory.tenant(&claim.tenant).await?.and_then(|t| t.customer),
    };
    let Some(customer) = customer else {
        return failed(parts, claim, RechargeFailure::NoPaymentMethod, "the tenant has no Stripe customer").await;
    };
    let Some(charger) = parts.charger else {
        return Ok(Delivered::Retry(
            "no Stripe secret key to charge with (STRIPE_SECRET_KEY or secret_key_file)".into(),
        ));
    };
    let namespace = parts.usage.identifier_namespace().await?;
    charge(parts, claim, charger, &namespace, &customer, (&setting, &spec), &open).await
}

/// Why the pack a claim counted is no longer the one its plan recharges, if it is not: the
/// plan's price is another (a plan change, a reload), its pack grants other units, or the
/// claim was counted at another amount than the setting's (the setting changed while it was
/// open).
fn pack_changed(setting: &RechargeSetting, spec: &RechargeSpec, open: &RechargeClaim) -> Option<String> {
    if !setting.price.is_empty() && setting.price != spec.price {
        return Some(format!(
            "the plan now recharges price `{}`, the setting was made for `{}`",
            spec.price, setting.price
        ));
    }
    if spec.pack_units != setting.pack.units {
        return Some(format!(
            "a pack of `{}` now grants {} units, the setting counted {}",
            spec.price, spec.pack_units, setting.pack.units
        ));
    }
    // The plan's bounds now (a downgrade): the tenant's own `to` and limit must still fit.
    if setting.to > spec.to || setting.monthly_limit > spec.monthly_limit {
        return Some(format!(
            "the plan now allows `to` {} and {} a month; the setting has {} and {}",
            spec.to, spec.monthly_limit, setting.to, setting.monthly_limit
        ));
    }
    if open.packs.checked_mul(setting.pack.amount) != Some(open.amount) {
        return Some(format!(
            "recharge {} was counted at {} for {} packs, not at the setting's pack",
            open.n, open.amount, open.packs
        ));
    }
    None
}

/// Turns `claim`'s recharge off for `why` (no payment failed: nothing was charged), its
/// amount back to the month; alerted once.
async fn stop(parts: &Parts<'_>, claim: &Claimed, why: RechargeFailure, detail: &str) -> Result<Delivered, StoreError> {
    tracing::error!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, reason = why.as_str(), detail,
        "a recharge was not charged: recharge turned off until the tenant turns it on again");
    use crate::store::QuotaStoreExt as _;
    let mode = RechargeMode::Stop { n: claim.n, why };
    match parts.quota.apply_recharge(&claim.tenant, &claim.meter, mode, parts.now).await? {
        RechargeSeen::Failed { off, first, .. } => Ok(Delivered::Failed { why, off, first, action: None }),
        _ => Ok(Delivered::Closed),
    }
}

#[cfg(feature = "stripe")]
async fn charge(
    parts: &Parts<'_>,
    claim: &Claimed,
    charger: &crate::billing::Charger,
    namespace: &str,
    customer: &str,
    (setting, spec): (&RechargeSetting, &RechargeSpec),
    open: &RechargeClaim,
) -> Result<Delivered, StoreError> {
    use crate::billing::recharge::{Charged, Order};
    // A setting stored before tollgate kept its price: the plan's (its pack checked above).
    let price = if setting.price.is_empty() { spec.price.as_str() } else { setting.price.as_str() };
    let currency = parts.config.billing().currency.clone().unwrap_or_default();
    // Its amount on Stripe is the one the setting counted, in the billing currency.
    match charger.price_now(price).await {
        Ok(Ok((amount, of))) if amount == setting.pack.amount && of.eq_ignore_ascii_case(&currency) => {}
        // Gone, or no longer readable with the key: never charged blind, turned off (alerted)
        // rather than told "under way" for good.
        Ok(Err(why)) => return stop(parts, claim, RechargeFailure::PriceChanged, &why).await,
        Ok(Ok((amount, of))) => {
            let why = format!(
                "price `{price}` is now {amount} {of} a pack; the setting counted {} {currency}",
                setting.pack.amount
            );
            return stop(parts, claim, RechargeFailure::PriceChanged, &why).await;
        }
        Err(why) => return Ok(Delivered::Retry(format!("the recharge's price could not be read: {why}"))),
    }
    let order = Order {
        namespace,
        customer,
        tenant: claim.tenant.as_str(),
        meter: claim.meter.as_str(),
        n: claim.n,
        price,
        packs: claim.packs,
        currency: &currency,
        automatic_tax: spec.automatic_tax,
        claimed_at: open.claimed_at,
        processing: open.processing,
        now: parts.now,
    };
    match charger.charge(&order).await {
        Charged::Paid(invoice) => Ok(Delivered::Paid { invoice, claimed_at: open.claimed_at }),
        Charged::Processing(invoice) => {
            use crate::store::QuotaStoreExt as _;
            let mode = RechargeMode::Processing { n: claim.n, now: parts.now };
            parts.quota.apply_recharge(&claim.tenant, &claim.meter, mode, parts.now).await?;
            tracing::info!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, %invoice,
                "a recharge's payment is processing (a bank debit): it waits for invoice.paid or invoice.payment_failed");
            Ok(Delivered::Processing)
        }
        Charged::Failed(why, detail, invoice) => {
            let counted = failed(parts, claim, why, &detail).await;
            // Counted by this delivery: its invoice is voided, so that it is never paid beside
            // the next one (counted first by its webhook, the webhook decided: a 3-D Secure
            // invoice it told the tenant of stays open).
            if let (Ok(Delivered::Failed { first: true, .. }), Some(invoice)) = (&counted, invoice) {
                charger.void(&invoice).await;
            }
            counted
        }
        Charged::ActionRequired { invoice, url, detail } => {
            // Never voided: the customer pays it on its page.
            let url = url.unwrap_or_default();
            let mode = RechargeMode::ActionRequired { n: claim.n, url: url.clone(), now: parts.now };
            let counted = count(parts, claim, RechargeFailure::ActionRequired, &detail, mode).await?;
            Ok(match counted {
                Delivered::Failed { why, off, first, .. } => {
                    let action = crate::store::RechargeAction::new(claim.n, &url, parts.now).map(|_| (invoice, url));
                    Delivered::Failed { why, off, first, action }
                }
                other => other,
            })
        }
        Charged::Retry(why) => Ok(Delivered::Retry(why)),
    }
}

#[cfg(not(feature = "stripe"))]
#[allow(clippy::unused_async)]
async fn charge(
    _: &Parts<'_>,
    _: &Claimed,
    charger: &crate::billing::Charger,
    _: &str,
    _: &str,
    _: (&RechargeSetting, &RechargeSpec),
    _: &RechargeClaim,
) -> Result<Delivered, StoreError> {
    match *charger {}
}

/// Counts a failure of `claim` in the store (once per recharge, whoever counts it: this
/// delivery or the invoice's webhook).
async fn failed(
    parts: &Parts<'_>,
    claim: &Claimed,
    why: RechargeFailure,
    detail: &str,
) -> Result<Delivered, StoreError> {
    count(parts, claim, why, detail, RechargeMode::Failed { n: claim.n, why, now: parts.now }).await
}

/// Counts a failure of `claim` by `mode` (a [`RechargeMode::Failed`] or
/// [`RechargeMode::ActionRequired`]), as [`failed`] does.
async fn count(
    parts: &Parts<'_>,
    claim: &Claimed,
    why: RechargeFailure,
    detail: &str,
    mode: RechargeMode,
) -> Result<Delivered, StoreError> {
    tracing::warn!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, reason = why.as_str(), detail,
        "a recharge's payment failed");
    use crate::store::QuotaStoreExt as _;
    match parts.quota.apply_recharge(&claim.tenant, &claim.meter, mode, parts.now).await? {
        RechargeSeen::Failed { off, first, .. } => Ok(Delivered::Failed { why, off, first, action: None }),
        // Not open any more (paid meanwhile): nothing counted.
        _ => Ok(Delivered::Closed),
    }
}
