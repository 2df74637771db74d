//! A tenant's own recharge settings, within its plan's bounds (`recharge.METER`): kept by the
//! quota store beside the balance (a mode of `reserve`,
//! [`RechargeMode::Set`](crate::store::RechargeMode::Set)), so every node's refills watch the
//! same. Set through [`Admin::set_recharge`](crate::Admin::set_recharge), the CLI and
//! [`Tollgate::set_recharge`](crate::Tollgate::set_recharge).

use super::plan::{served_tenant, Unserved};
use crate::{
    base::{MeterId, TenantId},
    billing::Charger,
    config::{Config, PlanSpec, RechargeSpec},
    store::{DirectoryStore, QuotaStore, RechargeMode, RechargePack, RechargeSetting, RechargeState, StoreError},
};

/// What a tenant asks of its recharge: each value it leaves out is its plan's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RechargeAsk {
    /// The balance under which a recharge is claimed (units of the meter).
    pub below: Option<u64>,
    /// The balance a recharge brings it to, at least (at most the plan's).
    pub to: Option<u64>,
    /// The most recharges spend in a calendar month (UTC), a decimal of the currency (at most
    /// the plan's).
    pub monthly_limit: Option<String>,
}

impl RechargeAsk {
    /// Below `below`, to `to`, at most `monthly_limit` a month (each `None`: the plan's).
    #[must_use]
    pub fn new(below: Option<u64>, to: Option<u64>, monthly_limit: Option<String>) -> Self {
        Self { below, to, monthly_limit }
    }
}

/// Why a tenant's recharge was not set: nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RechargeError {
    /// No such tenant (in the file nor the directory).
    #[error("no tenant `{0}`")]
    UnknownTenant(String),
    /// The tenant's plan allows no recharge of the meter.
    #[error("plan `{plan}` allows no recharge of `{meter}` ([plans.{plan}.recharge.{meter}])")]
    NoRecharge {
        /// The plan.
        plan: String,
        /// The meter.
        meter: String,
    },
    /// A value outside the plan's bounds, or not a value at all: said which.
    #[error("{0}")]
    Invalid(String),
    /// The tenant's plan cannot be served under this configuration (its overrides name a
    /// meter or feature it does not have): nothing can be set until the operator mends them.
    #[error("the tenant's plan is not served: {0}")]
    NotServed(String),
    /// The credit price's amount could not be read from Stripe (no secret key, a price
    /// without `unit_amount`, another currency, Stripe unreachable): nothing was stored.
    #[error("the recharge's price could not be read from Stripe: {0}")]
    Price(String),
    /// The tenant may not turn recharge on through its own route on this plan
    /// (`tenant_may_set` is not set): only the operator may. Nothing was stored.
    #[error("plan `{plan}` lets only the operator turn on recharge of `{meter}` (its `tenant_may_set` is off)")]
    NotAllowed {
        /// The plan.
        plan: String,
        /// The meter.
        meter: String,
    },
    /// The store failed (nothing may have been stored; sending it again is safe).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A tenant's recharge of a meter: its plan's bounds and what the store keeps (its setting,
/// the open recharge, failures, the month's spending). Money in the smallest unit of the
/// currency (cents of `usd`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RechargeView {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// The currency (`[billing] currency`).
    pub currency: String,
    /// The plan's recharge: its price and bounds.
    pub plan: RechargeSpec,
    /// What the store keeps.
    pub state: RechargeState,
    /// Spent on this calendar month's recharges (UTC), open or paid.
    pub month_spent: u64,
    /// This calendar month's recharges, open or paid.
    pub month_count: u32,
}

impl RechargeView {
    /// Why recharge is off, if it is: `"not_turned_on"`, or the last payment failure's reason
    /// once failures turned it off (`"declined"`, `"action_required"`,
    /// `"no_payment_method"`, `"refused"`), or what turned it off at once (`"price_changed"`,
    /// `"grant_refused"`, `"refunded"`, `"disputed"`).
    #[must_use]
    pub fn off_reason(&self) -> Option<&'static str> {
        match (&self.state.setting, self.state.off) {
            (None, _) => Some("not_turned_on"),
            (Some(_), Some(why)) => Some(why.as_str()),
            (Some(_), None) => None,
        }
    }

    /// `minor` units of the currency (its smallest unit, as Stripe counts) as a decimal
    /// (`2000` cents → `"20.00"`).
    #[must_use]
    pub fn money(&self, minor: u64) -> String {
        crate::base::money_text(minor, &self.currency)
    }

    /// As the tenant's route answers it (money as decimal strings of the currency).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let money = |minor: u64| crate::base::money_text(minor, &self.currency);
        let own = self.state.setting.as_ref().map(|s| {
            serde_json::json!({
                "below": s.below,
                "to": s.to,
                "monthly_limit": money(s.monthly_limit),
                "pack": { "units": s.pack.units, "amount": money(s.pack.amount), "price": s.price },
                "set_by": s.set_by,
                "set_at": s.set_at,
            })
        });
        let open = self.state.open.map(|c| {
            serde_json::json!({ "n": c.n, "packs": c.packs, "amount": money(c.amount), "claimed_at": c.claimed_at })
        });
        serde_json::json!({
            "meter": self.meter.as_str(),
            "currency": self.currency,
            "on": self.state.on(),
            "off_reason": self.off_reason(),
            "settings": own,
            "plan": {
                "price": self.plan.price,
                "below": self.plan.below,
                "to": self.plan.to,
                "monthly_limit": money(self.plan.monthly_limit),
                "tenant_may_set": self.plan.tenant_may_set,
            },
            "failures": self.state.failures,
            "open": open,
            // A recharge whose payment waits for the tenant (3-D Secure): the page to pay it.
            "action": self.state.action.as_ref().map(|a| serde_json::json!({
                "recharge": a.n, "url": a.url, "at": a.at,
            })),
            "month": {
                "spent": money(self.month_spent),
                "recharges": self.month_count,
            },
        })
    }
}

/// The one meter `plan` recharges, for a caller that names none: `Err` with how many it
/// recharges when that is not one (none, or several: the caller must name one).
pub(crate) fn one_recharged_meter(plan: &PlanSpec) -> Result<MeterId, usize> {
    let meters: Vec<&MeterId> = plan.recharges().map(|(m, _)| m).collect();
    match meters.as_slice() {
        [only] => Ok((*only).clone()),
        more => Err(more.len()),
    }
}

/// What a call does with a tenant's recharge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RechargeAct {
    /// Reads it.
    Read,
    /// Turns it on (or changes it) with these values, by the operator or the tenant.
    Set(RechargeAsk, SetBy),
    /// Turns it off.
    Off,
}

/// Who turns a tenant's recharge on: what a setting records, and what the plan allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SetBy {
    /// `Admin`, the CLI, [`Tollgate::set_recharge`](crate::Tollgate::set_recharge): any plan.
    Operator,
    /// The tenant's own route, by a key with `recharge:write` (`"key:k_…"`) or an identity
    /// allowed it (`"tenant"`): only on a plan with `tenant_may_set`.
    Tenant(String),
}

impl SetBy {
    fn as_str(&self) -> &str {
        match self {
            Self::Operator => "operator",
            Self::Tenant(who) => who,
        }
    }
}

/// What a recharge setting reads and writes.
pub(crate) struct Parts<'a> {
    pub(crate) quota: &'a dyn QuotaStore,
    pub(crate) directory: &'a dyn DirectoryStore,
    pub(crate) config: &'a Config,
    pub(crate) charger: Option<&'a Charger>,
}

/// Reads, sets or turns off `tenant`'s recharge of `meter` (`act`), at `now` (Unix seconds).
pub(crate) async fn recharge(
    parts: &Parts<'_>,
    tenant: &TenantId,
    meter: &MeterId,
    act: RechargeAct,
    now: i64,
) -> Result<RechargeView, RechargeError> {
    let plan = match served_tenant(parts.directory, parts.config, tenant).await? {
        Ok((_, served)) => served.spec,
        Err(Unserved::UnknownTenant) => return Err(RechargeError::UnknownTenant(tenant.to_string())),
        Err(Unserved::UnknownPlan(plan)) => {
            return Err(RechargeError::NoRecharge { plan: plan.to_string(), meter: meter.to_string() })
        }
        Err(Unserved::Unreadable(why)) => return Err(RechargeError::NotServed(why)),
    };
    let no = || RechargeError::NoRecharge { plan: plan.id().to_string(), meter: meter.to_string() };
    let spec = plan.recharge(meter).cloned().ok_or_else(no)?;
    let currency = parts.config.billing().currency.clone().unwrap_or_default();
    let mode = match act {
        RechargeAct::Read => None,
        RechargeAct::Off => Some(RechargeMode::Set(None)),
        RechargeAct::Set(ask, by) => {
            if matches!(by, SetBy::Tenant(_)) && !spec.tenant_may_set {
                return Err(RechargeError::NotAllowed { plan: plan.id().to_string(), meter: meter.to_string() });
            }
            let setting = within(&spec, &ask, &currency)?;
            let amount = unit_amount(parts.charger, &spec.price, &currency).await?;
            let pack = RechargePack::new(spec.pack_units, amount);
            let setting = RechargeSetting::new(setting.0, setting.1, setting.2, pack)
                .with_price(spec.price.clone())
                .set_by(by.as_str(), now);
            Some(RechargeMode::Set(Some(setting)))
        }
    };
    if let Some(mode) = mode {
        crate::store::QuotaStoreExt::apply_recharge(parts.quota, tenant, meter, mode, now).await?;
    }
    let counters = parts.quota.counters(tenant, meter).await?;
    Ok(view_of(tenant, meter, currency, spec, &counters, now))
}

/// The view of `tenant`'s recharge of `meter` under its plan's `spec`, from the meter's
/// counters as the quota store holds them.
pub(crate) fn view_of(
    tenant: &TenantId,
    meter: &MeterId,
    currency: String,
    spec: RechargeSpec,
    counters: &[crate::store::QuotaCounter],
    now: i64,
) -> RechargeView {
    let state = counters.iter().find_map(|c| c.recharge.clone()).unwrap_or_default();
    let this_month = state.month == crate::store::month_of(now);
    let (month_spent, month_count) = if this_month { (state.spent, state.count) } else { (0, 0) };
    RechargeView { tenant: tenant.clone(), meter: meter.clone(), currency, plan: spec, state, month_spent, month_count }
}

/// The tenant's values (its plan's where it leaves one out), checked against the plan's
/// bounds: `(below, to, monthly_limit)`, the limit in the currency's smallest unit.
fn within(spec: &RechargeSpec, ask: &RechargeAsk, currency: &str) -> Result<(u64, u64, u64), RechargeError> {
    let to = ask.to.unwrap_or(spec.to);
    let below = ask.below.unwrap_or(spec.below.min(to.saturating_sub(1)));
    let limit = match &ask.monthly_limit {
        None => spec.monthly_limit,
        Some(text) => {
            let nanos = crate::base::parse_cap(text).map_err(RechargeError::Invalid)?;
            crate::base::minor_units_of(nanos, currency).ok_or_else(|| {
                RechargeError::Invalid(format!("\"{text}\" is not a whole amount of the smallest unit of {currency}"))
            })?
        }
    };
    if below == 0 || to == 0 {
        return Err(RechargeError::Invalid("`below` and `to` are whole numbers of units, more than 0".into()));
    }
    if to > spec.to {
        return Err(RechargeError::Invalid(format!("`to` ({to}) is above the most this plan allows: {}", spec.to)));
    }
    if below >= to {
        return Err(RechargeError::Invalid(format!("`below` ({below}) must be under `to` ({to})")));
    }
    if limit > spec.monthly_limit {
        return Err(RechargeError::Invalid(format!(
            "`monthly_limit` ({}) is above the most this plan allows: {}",
            crate::base::money_text(limit, currency),
            crate::base::money_text(spec.monthly_limit, currency)
        )));
    }
    Ok((below, to, limit))
}

/// The price's amount per unit, as Stripe says, in `currency`.
#[cfg_attr(not(feature = "stripe"), allow(clippy::unused_async))]
async fn unit_amount(charger: Option<&Charger>, price: &str, currency: &str) -> Result<u64, RechargeError> {
    #[cfg(feature = "stripe")]
    {
        let Some(charger) = charger else {
            return Err(RechargeError::Price(
                "no Stripe secret key (STRIPE_SECRET_KEY or [stripe] secret_key_file) to read it and charge with"
                    .into(),
            ));
        };
        let (amount, of) = charger.unit_amount(price).await.map_err(RechargeError::Price)?;
        if !of.eq_ignore_ascii_case(currency) {
            return Err(RechargeError::Price(format!(
                "price `{price}` is in {of}, not in [billing] currency {currency}"
            )));
        }
        Ok(amount)
    }
    #[cfg(not(feature = "stripe"))]
    {
        let _ = (charger, price, currency);
        Err(RechargeError::Price("recharge charges through Stripe: it needs the cargo feature `stripe`".into()))
    }
}

/// The most bytes of a body the recharge route reads.
pub(crate) const MAX_BODY: usize = 1024;
