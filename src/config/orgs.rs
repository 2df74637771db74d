//! `[orgs.<name>]`: organizations declared in the file, each on a plan whose limits its tenants
//! share (`[tenants.X] org = "NAME"`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{validator::Validator, ConfigError, PlanSpec};
use crate::base::{OrgId, Period, PlanId, QuotaMode};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOrg {
    pub(crate) plan: String,
}

/// An organization declared in the file: a group of tenants whose plan's limits apply to all of
/// them at once (a company above its projects). A tenant names its organization with
/// `[tenants.X] org = "NAME"`; each request of the tenant passes the tenant's own limits and
/// the organization's.
#[derive(Debug, Clone)]
pub struct OrgSpec {
    pub(crate) id: OrgId,
    pub(crate) plan: PlanId,
}

impl OrgSpec {
    /// The organization's name.
    #[must_use]
    pub fn id(&self) -> &OrgId {
        &self.id
    }

    /// The organization's plan, whose quotas its tenants share.
    #[must_use]
    pub fn plan(&self) -> &PlanId {
        &self.plan
    }
}

impl Validator<'_, '_> {
    /// `[orgs]`: each organization's name and plan, and what of the plan an organization
    /// enforces (its hard quotas per period; the rest is refused by key, with what it is).
    pub(super) fn orgs(
        &self,
        raw: &BTreeMap<String, RawOrg>,
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<BTreeMap<OrgId, OrgSpec>, ConfigError> {
        let mut orgs = BTreeMap::new();
        for (name, o) in raw {
            let base = format!("orgs.{name}");
            let id = OrgId::parse(name).map_err(|why| self.invalid(&base, why))?;
            let path = format!("{base}.plan");
            let plan = self.plan_ref(plans, &path, &o.plan)?;
            if let Err(why) = org_plan(&plans[&plan]) {
                return Err(self.invalid(&path, format!("plan `{plan}` {why}")));
            }
            orgs.insert(id.clone(), OrgSpec { id, plan });
        }
        Ok(orgs)
    }
}

/// Why `plan` cannot be an organization's: an organization enforces its plan's hard quotas
/// per period on meters (whatever takes their units: a route's cost, a handler's record, a
/// hold); rates, concurrency, spend caps, prepaid balances, soft quotas and quotas on series
/// are not enforced at organization scope yet, so a plan that has them is refused rather than
/// half applied.
fn org_plan(plan: &PlanSpec) -> Result<(), String> {
    let not_yet = |what: &str| {
        Err(format!(
            "has {what}, which an organization does not enforce yet: an organization's plan limits its \
             tenants together by hard quotas per period (declare the {what} on the tenants' plans)"
        ))
    };
    if plan.rate.is_some() {
        return not_yet("a rate");
    }
    if plan.concurrency.is_some() {
        return not_yet("a concurrency limit");
    }
    if plan.spend_max.is_some() {
        return not_yet("a spend cap");
    }
    if !plan.recharge.is_empty() {
        return not_yet("an auto-recharge");
    }
    if plan.shadow {
        return not_yet("shadow mode");
    }
    if plan.tenant_alerts {
        return not_yet("tenant alerts");
    }
    if plan.quotas.is_empty() {
        return Err("has no quota: an organization's plan limits its tenants together by its quotas".to_owned());
    }
    for (meter, quota) in &plan.quotas {
        if quota.period == Period::Prepaid {
            return not_yet(&format!("a prepaid balance of {meter}"));
        }
        if quota.mode != QuotaMode::Hard {
            return not_yet(&format!("a soft quota on {meter}"));
        }
        if meter.as_str().contains('{') {
            return not_yet(&format!("a quota on the series {meter}"));
        }
    }
    Ok(())
}
