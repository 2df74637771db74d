//! `[[routes]]`: what each route charges and reports.

use std::{
    collections::{BTreeMap, HashSet},
    num::NonZeroU32,
};

use serde::Deserialize;

use super::{validator::check_name, validator::Validator, EventSettings, MeterSpec, PlanSpec};
use super::{ConfigError, ConfigErrorKind as Kind, RoutePattern};
use crate::base::{MeterId, Period, PlanId, QuotaMode};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) method: Option<String>,
    pub(crate) path: String,
    pub(crate) meter: Option<String>,
    pub(crate) cost: Option<i64>,
    #[serde(default)]
    pub(crate) reports: Vec<String>,
    pub(crate) feature: Option<String>,
}

/// A route rule: method and path pattern, to a meter and a cost.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub(crate) method: Option<http::Method>,
    pub(crate) pattern: RoutePattern,
    pub(crate) meter: MeterId,
    pub(crate) cost: NonZeroU32,
    pub(crate) reports: Vec<MeterId>,
    pub(crate) feature: Option<String>,
}

impl RouteSpec {
    /// The feature a tenant's plan must include for this route (else 403).
    #[must_use]
    pub fn feature(&self) -> Option<&str> {
        self.feature.as_deref()
    }

    /// The method matched, or `None` for any method.
    #[must_use]
    pub fn method(&self) -> Option<&http::Method> {
        self.method.as_ref()
    }

    /// The path pattern as written.
    #[must_use]
    pub fn path(&self) -> &str {
        self.pattern.as_str()
    }

    /// The meter charged.
    #[must_use]
    pub fn meter(&self) -> &MeterId {
        &self.meter
    }

    /// Units charged (and rate cells spent) per request.
    #[must_use]
    pub fn cost(&self) -> NonZeroU32 {
        self.cost
    }

    /// The meters the route's handler reports (through `TenantContext::record`), besides the
    /// meter it charges: a hard quota on one of them, once spent, rejects the route's requests.
    #[must_use]
    pub fn reports(&self) -> &[MeterId] {
        &self.reports
    }
}

impl Validator<'_, '_> {
    /// `[[routes]]`, in order.
    pub(super) fn routes(
        &self,
        raw: &[RawRoute],
        meters: &[MeterSpec],
        default_meter: &MeterId,
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<Vec<RouteSpec>, ConfigError> {
        let mut routes = Vec::with_capacity(raw.len());
        let mut seen = HashSet::new();
        let mut features_seen: HashSet<String> = HashSet::new();
        for (i, r) in raw.iter().enumerate() {
            let base = format!("routes[{i}]");
            let method = match r.method.as_deref() {
                None | Some("*") => None,
                Some(m) => Some(self.method(&format!("{base}.method"), m)?),
            };
            let pattern = RoutePattern::parse(&r.path).map_err(|m| self.invalid(&format!("{base}.path"), m))?;
            let meter = match &r.meter {
                Some(m) => self.meter_ref(meters, &format!("{base}.meter"), m)?,
                None => default_meter.clone(),
            };
            let cost = match r.cost {
                None => NonZeroU32::MIN,
                Some(c) => u32::try_from(c).ok().and_then(NonZeroU32::new).ok_or_else(|| {
                    self.invalid(
                        &format!("{base}.cost"),
                        format!("must be a whole number from 1 to 4294967295, not {c}"),
                    )
                })?,
            };
            if !seen.insert((method.clone(), pattern.shape())) {
                return Err(self.loc.error(
                    Kind::Conflict,
                    &format!("{base}.path"),
                    format!("another route already matches {} {}", method.as_ref().map_or("*", |m| m.as_str()), r.path),
                ));
            }
            for plan in plans.values() {
                if plan.rate.is_some() && cost > plan.burst {
                    return Err(self.invalid(
                        &format!("{base}.cost"),
                        format!(
                            "cost {cost} is larger than the burst {} of plan `{}`: no request could ever pass",
                            plan.burst, plan.id
                        ),
                    ));
                }
            }
            let mut reports: Vec<MeterId> = Vec::with_capacity(r.reports.len());
            for (j, name) in r.reports.iter().enumerate() {
                let path = format!("{base}.reports[{j}]");
                let id = self.meter_ref(meters, &path, name)?;
                if id == meter {
                    return Err(self.invalid(
                        &path,
                        format!(
                            "`{id}` is the meter this route charges: list only the other meters its handler reports"
                        ),
                    ));
                }
                if reports.contains(&id) {
                    return Err(self.invalid(&path, format!("`{id}` is listed twice")));
                }
                reports.push(id);
            }
            let feature = match &r.feature {
                None => None,
                Some(f) => {
                    check_name(self, &format!("{base}.feature"), f)?;
                    if !features_seen.contains(f) {
                        if features_seen.len() == 64 {
                            return Err(self.invalid(
                                &format!("{base}.feature"),
                                "routes may require at most 64 distinct features",
                            ));
                        }
                        features_seen.insert(f.clone());
                    }
                    Some(f.clone())
                }
            };
            routes.push(RouteSpec { method, pattern, meter, cost, reports, feature });
        }
        Ok(routes)
    }

    /// A hard quota on a meter that no request is charged (the default meter, a route's
    /// `meter`) and no route `reports` could never reject anything: usage recorded by a
    /// handler would pass the limit unchecked. Soft quotas only count overage, so they may be
    /// on any meter.
    pub(super) fn hard_quotas_are_reachable(
        &self,
        plans: &BTreeMap<PlanId, PlanSpec>,
        routes: &[RouteSpec],
        default_meter: &MeterId,
        events: &EventSettings,
    ) -> Result<(), ConfigError> {
        let enforced = |m: &MeterId| {
            m == default_meter
                || routes.iter().any(|r| &r.meter == m || r.reports.contains(m))
                || events.products.values().any(|e| e == m)
        };
        for plan in plans.values() {
            for (meter, quota) in &plan.quotas {
                if quota.mode == QuotaMode::Hard && !enforced(meter) {
                    return Err(self.invalid(
                        &format!("plans.{}.quotas.{meter}", plan.id),
                        format!(
                            "a hard quota on `{meter}`, but no route charges it (`meter`) or reports it \
                             (`reports = [\"{meter}\"]`), so nothing would ever be rejected: list it in the \
                             `reports` of the routes whose handler records it{}",
                            if quota.period == Period::Prepaid { "" } else { ", or make the quota soft" }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
