//! `[plans.<name>.recharge.<meter>]`: a plan allows auto-recharge of a prepaid balance, within
//! bounds a tenant chooses its own settings in (docs/credits.md, "Recharge").

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{validator::Validator, ConfigError, QuotaSpec};
use crate::base::{MeterId, Period};

/// A plan's recharge of one meter as written.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRecharge {
    pub(crate) price: Option<String>,
    pub(crate) below: Option<i64>,
    pub(crate) to: Option<i64>,
    pub(crate) monthly_limit: Option<String>,
    pub(crate) tenant_may_set: Option<bool>,
    pub(crate) automatic_tax: Option<bool>,
}

/// A plan's recharge of one prepaid meter: the credit price a recharge buys (one of
/// `[stripe.credits.prices]`), and the bounds of a tenant's own settings (the defaults a tenant
/// turning recharge on without its own gets): a tenant's `to` is at most the plan's, its
/// `monthly_limit` at most the plan's, and its `below` under its `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RechargeSpec {
    /// The Stripe price id a recharge buys (an invoice item of it).
    pub price: String,
    /// Units of the meter one unit of the price grants (`[stripe.credits.prices]`); filled
    /// once `[stripe]` is read.
    pub pack_units: u64,
    /// The balance under which a recharge is claimed, by default.
    pub below: u64,
    /// The balance a recharge brings it to, at most (and by default).
    pub to: u64,
    /// The most spent on recharges in a calendar month (UTC), in the smallest unit of the
    /// billing currency (cents for `usd`), at most (and by default).
    pub monthly_limit: u64,
    /// Whether the tenant may turn recharge on (or change it) through its own route
    /// (`tenant_may_set`, default `false`: only the operator may, and the tenant's route
    /// answers 403; it may always read it and turn it off).
    pub tenant_may_set: bool,
    /// Whether a recharge's invoice asks Stripe Tax to compute its tax (`automatic_tax`,
    /// default `false`): the customer then pays the packs plus tax, while `monthly_limit`
    /// counts the packs' amount before tax.
    pub automatic_tax: bool,
}

impl Validator<'_, '_> {
    /// A plan's `recharge` tables: each on a meter the plan holds prepaid, `below < to`, a
    /// price named (checked against `[stripe.credits]` once it is read), a
    /// monthly limit in the billing currency.
    pub(super) fn recharges(
        &self,
        base: &str,
        raw: &BTreeMap<String, RawRecharge>,
        quotas: &BTreeMap<MeterId, QuotaSpec>,
        billing: &super::BillingSettings,
    ) -> Result<BTreeMap<MeterId, RechargeSpec>, ConfigError> {
        let mut out = BTreeMap::new();
        for (meter, r) in raw {
            let key = format!("{base}.recharge.{meter}");
            let id = MeterId::from(meter.as_str());
            if !quotas.get(&id).is_some_and(|q| q.period == Period::Prepaid) {
                return Err(self.invalid(
                    &key,
                    format!(
                        "recharge tops up a prepaid balance, and this plan holds none on `{meter}`: \
                         add quotas.{meter} = {{ period = \"prepaid\" }} or remove the table"
                    ),
                ));
            }
            let Some(price) = r.price.as_deref().filter(|p| !p.trim().is_empty()) else {
                return Err(
                    self.invalid(&format!("{key}.price"), "a recharge names the credit price it buys (\"price_…\")")
                );
            };
            // An invoice item names a price by id: a lookup key would be refused by Stripe at
            // every recharge.
            if !(price.starts_with("price_") || price.starts_with("plan_")) {
                return Err(self.invalid(
                    &format!("{key}.price"),
                    format!(
                        "`{price}` is not a Stripe price id (\"price_…\", or a legacy plan's \"plan_…\"): a recharge's \
                         invoice item names its price by id, never by lookup key"
                    ),
                ));
            }
            let units = |name: &str, v: Option<i64>| {
                let path = format!("{key}.{name}");
                let v =
                    v.ok_or_else(|| self.invalid(&path, format!("a recharge needs `{name}`, in units of `{meter}`")))?;
                u64::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| {
                    self.invalid(&path, format!("a whole number of units of `{meter}`, more than 0, not {v}"))
                })
            };
            let below = units("below", r.below)?;
            let to = units("to", r.to)?;
            if to <= below {
                return Err(self.invalid(
                    &format!("{key}.to"),
                    format!("`to` ({to}) must be more than `below` ({below}): a recharge brings the balance above where it starts"),
                ));
            }
            let path = format!("{key}.monthly_limit");
            let Some(currency) = billing.currency.as_deref() else {
                return Err(
                    self.invalid(&path, "a recharge's monthly limit needs the currency: [billing] currency = \"usd\"")
                );
            };
            let Some(limit) = r.monthly_limit.as_deref() else {
                return Err(self.invalid(&path, "a recharge needs a monthly limit, in money (\"200.00\")"));
            };
            let nanos = self.money(&path, limit)?;
            let monthly_limit = crate::base::minor_units_of(nanos, currency).ok_or_else(|| {
                self.invalid(&path, format!("\"{limit}\" is not a whole amount of the smallest unit of {currency}"))
            })?;
            let tenant_may_set = r.tenant_may_set.unwrap_or(false);
            let automatic_tax = r.automatic_tax.unwrap_or(false);
            let spec = RechargeSpec {
                price: price.to_owned(),
                pack_units: 0,
                below,
                to,
                monthly_limit,
                tenant_may_set,
                automatic_tax,
            };
            out.insert(id, spec);
        }
        Ok(out)
    }
}
