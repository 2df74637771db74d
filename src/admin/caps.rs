//! Spend caps tenants may set themselves (within the plan's `spend.max_limit`).

use crate::{
    base::QuotaMode,
    settings::caps::{parse, spend_cap, CapAct, SpendCapView},
};

use super::{Admin, AdminError};

impl Admin {
    /// Sets `tenant`'s own spend cap to `limit` (a decimal amount of `[billing] currency`,
    /// `"25.00"`) in `mode`, or with `None` removes it (the plan's cap holds again). It may be
    /// lower or higher than the plan's cap, up to the plan's `spend.max_limit` (or the
    /// operator's override of it). Kept in the quota store beside the tenant's spend counters:
    /// every node holds its reservations to it from its next call (a raised cap is seen within
    /// a second; a lowered one lets through at most the spend leases nodes hold already, one
    /// per node). Returns the cap in force after it.
    ///
    /// # Errors
    /// A bad tenant id, no configuration or quota store, a tenant that does not exist or
    /// whose plan has no spend cap, a limit that is not an amount or is above the maximum
    /// ([`AdminError::SpendCap`]; nothing is stored), or the store failed.
    pub async fn set_spend_cap(
        &self,
        tenant: &str,
        limit: Option<&str>,
        mode: QuotaMode,
    ) -> Result<SpendCapView, AdminError> {
        let id = Self::tenant_id(tenant)?;
        let config =
            self.config.as_ref().ok_or_else(|| AdminError::Invalid("no configuration to read plans from".into()))?;
        let act = match limit {
            Some(l) => CapAct::Set(parse(l, mode == QuotaMode::Hard).map_err(AdminError::SpendCap)?),
            None => CapAct::Remove,
        };
        let now = self.clock.unix_secs();
        let before = spend_cap(self.quota()?.as_ref(), self.directory.as_ref(), config, &id, CapAct::Read, now).await;
        let view = spend_cap(self.quota()?.as_ref(), self.directory.as_ref(), config, &id, act, now)
            .await
            .map_err(AdminError::SpendCap)?;
        self.changed(&id).await;
        let before = crate::settings::before_text(before, |v| crate::settings::cap_text(v.own));
        self.record(&id, crate::store::Setting::SpendCap, before, crate::settings::cap_text(view.own)).await;
        Ok(view)
    }

    /// `tenant`'s spend cap: the plan's, the tenant's own if it set one, the one in force.
    ///
    /// # Errors
    /// As [`set_spend_cap`](Self::set_spend_cap), without the limit's.
    pub async fn spend_cap(&self, tenant: &str) -> Result<SpendCapView, AdminError> {
        let id = Self::tenant_id(tenant)?;
        let config =
            self.config.as_ref().ok_or_else(|| AdminError::Invalid("no configuration to read plans from".into()))?;
        spend_cap(self.quota()?.as_ref(), self.directory.as_ref(), config, &id, CapAct::Read, self.clock.unix_secs())
            .await
            .map_err(AdminError::SpendCap)
    }
}
