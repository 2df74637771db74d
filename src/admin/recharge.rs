//! Auto-recharge of tenants' prepaid balances, within their plans' bounds
//! (`[plans.X.recharge.METER]`).

use crate::{
    base::MeterId,
    settings::{
        plan::{served_tenant, Unserved},
        recharge::{one_recharged_meter, recharge, Parts, RechargeAct, RechargeAsk, RechargeView},
    },
};

use super::{Admin, AdminError};

impl Admin {
    /// Turns `tenant`'s recharge of `meter` on with its own values (`ask`: each value left
    /// out is the plan's; `to` and `monthly_limit` at most the plan's, `below` under `to`), or
    /// off (`None`). Turning it on again after payment failures turned it off is this call.
    /// The credit price's amount is read from Stripe with the secret key (`[stripe]`
    /// `secret_key_file` or `STRIPE_SECRET_KEY`) and kept with the setting. Kept in the quota
    /// store beside the balance: every node's next refill watches it.
    ///
    /// # Errors
    /// A bad tenant id, no configuration or quota store, an unknown tenant, a plan that does
    /// not recharge `meter`, a value outside the plan's bounds, a price Stripe could not say
    /// ([`AdminError::Recharge`]; nothing is stored), or the store failed.
    pub async fn set_recharge(
        &self,
        tenant: &str,
        meter: &str,
        ask: Option<RechargeAsk>,
    ) -> Result<RechargeView, AdminError> {
        let act = ask.map_or(RechargeAct::Off, |ask| RechargeAct::Set(ask, crate::settings::recharge::SetBy::Operator));
        let charging = matches!(act, RechargeAct::Set(..));
        self.recharge_act(tenant, meter, act, charging).await
    }

    /// `tenant`'s recharge of `meter`: the plan's bounds, its own settings, whether it is on
    /// (and why not), the recharge under way, failures in a row, the month's spending.
    ///
    /// # Errors
    /// As [`set_recharge`](Self::set_recharge), without the values'.
    pub async fn recharge(&self, tenant: &str, meter: &str) -> Result<RechargeView, AdminError> {
        self.recharge_act(tenant, meter, RechargeAct::Read, false).await
    }

    /// The one meter `tenant`'s plan recharges (for a caller that names none).
    ///
    /// # Errors
    /// A bad tenant id, no configuration, an unknown tenant, a plan that recharges no meter or
    /// several ([`AdminError::Invalid`]: name one).
    pub async fn recharged_meter(&self, tenant: &str) -> Result<MeterId, AdminError> {
        let id = Self::tenant_id(tenant)?;
        let config =
            self.config.as_ref().ok_or_else(|| AdminError::Invalid("no configuration to read plans from".into()))?;
        let plan = match served_tenant(self.directory.as_ref(), config, &id).await? {
            Ok((_, served)) => served.spec,
            Err(Unserved::UnknownTenant) => return Err(AdminError::Invalid(format!("no tenant `{tenant}`"))),
            Err(Unserved::UnknownPlan(plan)) => return Err(AdminError::Invalid(format!("no plan `{plan}`"))),
            Err(Unserved::Unreadable(why)) => {
                return Err(AdminError::Invalid(format!("the plan of `{tenant}` is not served: {why}")))
            }
        };
        match one_recharged_meter(&plan) {
            Ok(only) => Ok(only),
            Err(0) => Err(AdminError::Invalid(format!("plan `{}` of `{tenant}` recharges no meter", plan.id()))),
            Err(_) => Err(AdminError::Invalid(format!("plan `{}` recharges several meters: name one", plan.id()))),
        }
    }

    async fn recharge_act(
        &self,
        tenant: &str,
        meter: &str,
        act: RechargeAct,
        charging: bool,
    ) -> Result<RechargeView, AdminError> {
        let id = Self::tenant_id(tenant)?;
        let config =
            self.config.as_ref().ok_or_else(|| AdminError::Invalid("no configuration to read plans from".into()))?;
        let charger = if charging { self.charger(config) } else { None };
        let quota = self.quota()?;
        let parts =
            Parts { quota: quota.as_ref(), directory: self.directory.as_ref(), config, charger: charger.as_deref() };
        let (meter, now) = (MeterId::from(meter), self.clock.unix_secs());
        let writes = !matches!(act, RechargeAct::Read);
        let before = if writes { Some(recharge(&parts, &id, &meter, RechargeAct::Read, now).await) } else { None };
        let view = recharge(&parts, &id, &meter, act, now).await.map_err(AdminError::Recharge)?;
        if writes {
            let before = before.and_then(|read| crate::settings::before_text(read, crate::settings::recharge_text));
            self.record(&id, crate::store::Setting::Recharge, before, crate::settings::recharge_text(&view)).await;
        }
        Ok(view)
    }

    /// What reads the price's amount: the one given, else `[stripe]`'s.
    fn charger(&self, config: &crate::config::Config) -> Option<std::sync::Arc<crate::billing::Charger>> {
        if let Some(c) = &self.charger {
            return Some(c.clone());
        }
        #[cfg(feature = "stripe")]
        {
            crate::billing::RechargeCharger::from_config(config).ok().map(std::sync::Arc::new)
        }
        #[cfg(not(feature = "stripe"))]
        {
            let _ = config;
            None
        }
    }

    /// Reads recharge prices with `charger` (a stand-in's, a proxy's) rather than `[stripe]`'s.
    #[cfg(feature = "stripe")]
    #[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
    #[must_use]
    pub fn with_recharge_charger(mut self, charger: crate::billing::RechargeCharger) -> Self {
        self.charger = Some(std::sync::Arc::new(charger));
        self
    }
}
