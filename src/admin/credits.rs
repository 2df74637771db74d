//! Prepaid credits: granted, listed and revoked, a tenant's quota counters, and its payments.

use std::sync::Arc;

use crate::{
    config::{MeterId, TenantId},
    store::{unix_now, CreditBalance, CreditClosure, CreditGrant, GrantOutcome, QuotaStore},
};

use super::{Admin, AdminError};

impl Admin {
    pub(super) fn quota(&self) -> Result<&Arc<dyn QuotaStore>, AdminError> {
        self.quota.as_ref().ok_or_else(|| {
            AdminError::Invalid("prepaid credits live in the quota store: none is given (Admin::with_quota)".into())
        })
    }

    fn credit_meter(&self, meter: &str) -> Result<MeterId, AdminError> {
        let id = MeterId::from(meter);
        match &self.config {
            Some(c) if !c.meters().iter().any(|m| m.id() == &id) => {
                Err(AdminError::Invalid(format!("`{meter}` is not a meter of the configuration")))
            }
            _ => Ok(id),
        }
    }

    /// Grants `units` prepaid units to `tenant` on `meter`, expiring at `expires_at` (Unix
    /// seconds) if given, under `grant_id`: the balance grows by them in the same write that
    /// records the grant, once per id (a grant sent again under its id adds nothing and answers
    /// [`GrantOutcome::Duplicate`]). Grants are spent soonest-to-expire first. Running nodes
    /// lease from the new balance at their next refill.
    ///
    /// # Errors
    /// A bad tenant id, a meter the configuration lacks, no units, an expiry not in the
    /// future, an empty or overlong grant id, no quota store, or the store failed.
    pub async fn grant_credits(
        &self,
        tenant: &str,
        meter: &str,
        units: u64,
        expires_at: Option<i64>,
        grant_id: &str,
    ) -> Result<GrantOutcome, AdminError> {
        let tenant_id = Self::tenant_id(tenant)?;
        let meter = self.credit_meter(meter)?;
        if units == 0 || units > crate::base::MAX_BALANCE {
            return Err(AdminError::Invalid(format!("{units} units: a grant holds 1 to 2^50 units")));
        }
        // A tenant of the directory or of the file: a typo never makes a balance of its own.
        let filed = self.config.as_ref().is_some_and(|c| c.tenants().iter().any(|t| t.id() == &tenant_id));
        if !filed && self.directory.tenant(&tenant_id).await?.is_none() {
            return Err(AdminError::UnknownTenant(tenant.to_owned()));
        }
        let tenant = tenant_id;
        let now = unix_now();
        if expires_at.is_some_and(|at| at <= now) {
            return Err(AdminError::Invalid("the grant would expire before it is made".into()));
        }
        if grant_id.is_empty() || grant_id.len() > 255 || !grant_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AdminError::Invalid(format!(
                "`{grant_id}` is not a grant id: 1 to 255 visible ASCII characters"
            )));
        }
        let grant = CreditGrant::new(tenant.clone(), meter, grant_id, units, now).expiring(expires_at);
        let outcome = self.quota()?.grant_credits(&grant).await?;
        self.changed(&tenant).await;
        Ok(outcome)
    }

    /// A tenant's quota counters in the store, on every meter of the configuration (by meter,
    /// then period start): what each holds, leases included (see
    /// [`QuotaStore::counters`]). With every node stopped,
    /// what was used.
    ///
    /// # Errors
    /// A bad tenant id, no configuration or quota store, or the store failed.
    pub async fn quota_counters(&self, tenant: &str) -> Result<Vec<crate::store::QuotaCounter>, AdminError> {
        let tenant = Self::tenant_id(tenant)?;
        self.counters_of(&tenant).await
    }

    /// An organization's quota counters (`[orgs.NAME]`), kept beside its tenants' under its
    /// counters' id (`org NAME`), as [`quota_counters`](Self::quota_counters) reads a
    /// tenant's.
    ///
    /// # Errors
    /// A name the configuration does not declare, no quota store, or the store failed.
    pub async fn org_counters(&self, org: &str) -> Result<Vec<crate::store::QuotaCounter>, AdminError> {
        let config =
            self.config.as_ref().ok_or_else(|| AdminError::Invalid("no configuration to read the meters of".into()))?;
        let Some(spec) = config.orgs().get(org) else {
            return Err(AdminError::Invalid(format!("no organization `{org}` in the configuration ([orgs.{org}])")));
        };
        self.counters_of(&spec.id().counters_id()).await
    }

    /// A tenant's quota counters of one meter (the dashboard's money page reads the meters
    /// of money alone).
    #[cfg_attr(not(feature = "dashboard"), allow(dead_code))]
    pub(crate) async fn meter_counters(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
    ) -> Result<Vec<crate::store::QuotaCounter>, AdminError> {
        Ok(self.quota()?.counters(tenant, meter).await?)
    }

    /// A tenant's payments as the quota store keeps them: each payment (at most
    /// [`PAYMENTS_KEPT`](crate::store::PAYMENTS_KEPT), older ones folded into one sum) with its
    /// refunds and disputes, the reversals of payments not seen yet, the tier pinned.
    ///
    /// # Errors
    /// A bad tenant id, no quota store, or the store failed.
    pub async fn payments(&self, tenant: &str) -> Result<crate::store::PaymentRow, AdminError> {
        let tenant = Self::tenant_id(tenant)?;
        let answer =
            self.quota()?.payments(&crate::store::PaymentCall::Read { tenant }, self.clock.unix_secs()).await?;
        Ok(answer.row.unwrap_or_default())
    }

    async fn counters_of(&self, tenant: &TenantId) -> Result<Vec<crate::store::QuotaCounter>, AdminError> {
        let config =
            self.config.as_ref().ok_or_else(|| AdminError::Invalid("no configuration to read the meters of".into()))?;
        let quota = self.quota()?;
        let mut out = Vec::new();
        for meter in config.meters() {
            out.extend(quota.counters(tenant, meter.id()).await?);
        }
        Ok(out)
    }

    /// A tenant's credit grants (open, and closed ones kept: at least 35 days) by meter and
    /// spending order,
    /// with the balance of each meter.
    ///
    /// # Errors
    /// A bad tenant id, no quota store, or the store failed.
    pub async fn credits(&self, tenant: &str) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), AdminError> {
        let tenant = Self::tenant_id(tenant)?;
        Ok(self.quota()?.credit_grants(&tenant, None).await?)
    }

    /// Revokes an open grant at once: its units leave the balance, taken from what the balance
    /// still holds first (its granted units less those used or leased), only the rest from the
    /// units counted used, as a refund takes them ([`CreditClosure::lost`] says how many were
    /// unspent). `meter` may be left out when the id names one grant of the tenant.
    ///
    /// # Errors
    /// No such open grant, an id that names grants on several meters without `meter`, no quota
    /// store, or the store failed.
    pub async fn revoke_credits(
        &self,
        tenant: &str,
        meter: Option<&str>,
        grant_id: &str,
    ) -> Result<CreditClosure, AdminError> {
        let tenant_id = Self::tenant_id(tenant)?;
        let quota = self.quota()?;
        let (grants, _) = quota.credit_grants(&tenant_id, meter.map(MeterId::from).as_ref()).await?;
        let open: Vec<&CreditGrant> = grants.iter().filter(|g| g.id == grant_id && g.closed.is_none()).collect();
        let grant = match open.as_slice() {
            [one] => *one,
            [] => return Err(AdminError::Invalid(format!("{tenant} has no open grant `{grant_id}`"))),
            _ => {
                return Err(AdminError::Invalid(format!(
                    "{tenant} has grants `{grant_id}` on several meters: name the meter"
                )))
            }
        };
        let closed = quota.close_credits(&tenant_id, &grant.meter, grant_id, true, unix_now()).await?;
        self.changed(&tenant_id).await;
        closed.ok_or_else(|| AdminError::Invalid(format!("{tenant} has no open grant `{grant_id}`")))
    }
}
