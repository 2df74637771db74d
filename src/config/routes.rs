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
    /// `hold.METER = N`, or `{ header, default, max }`.
    #[serde(default)]
    pub(crate) hold: BTreeMap<String, RawHold>,
    pub(crate) actual_header: Option<String>,
    pub(crate) settle: Option<String>,
    pub(crate) overrun: Option<String>,
    pub(crate) hold_timeout: Option<String>,
    /// The held meter's dimension values: `{ model = { header = "x-model" }, kind = "output" }`.
    #[serde(default)]
    pub(crate) hold_values: BTreeMap<String, RawValue>,
}

/// A dimension's value for a route's hold: written, or read from the request.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(untagged)]
pub(crate) enum RawValue {
    Value(String),
    From(RawValueFrom),
}

/// `{ header = "x-model" }` or `{ path = "model" }` (a `{model}` of the route's path): one of
/// them, nothing else (a `default` is not read).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawValueFrom {
    pub(crate) header: Option<String>,
    pub(crate) path: Option<String>,
}

/// Where a route's hold finds a value of its meter's dimension (`hold_values`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ValueSource {
    /// This value, for every request.
    Value(Box<str>),
    /// The request header's value (a request without it, or with a value the dimension's list
    /// lacks, is answered as `on_unknown` says: 400 `InvalidDimension`, or `other`).
    Header(http::HeaderName),
    /// The segment of the request's path that the route's `{name}` parameter matches, as the
    /// routers see it (escapes decoded); a value the list lacks is answered as `on_unknown`
    /// says.
    Path {
        /// The parameter's name in the route's path.
        name: Box<str>,
        /// Its position among the path's segments (0: the first after the leading `/`).
        segment: usize,
    },
}

/// A route's hold estimate: a number of units, or read from a request header.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(untagged)]
pub(crate) enum RawHold {
    Units(i64),
    Header(RawHeaderHold),
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeaderHold {
    pub(crate) header: String,
    pub(crate) default: i64,
    pub(crate) max: i64,
}

/// What a record beyond its hold does ([`TenantContext::hold_with`](crate::TenantContext::hold_with)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overrun {
    /// Recorded anyway: what the hold does not cover is taken from the node's lease, past the
    /// limit if need be (the period then stays spent), as
    /// [`TenantContext::record`](crate::TenantContext::record) does. The default.
    #[default]
    Debt,
    /// Refused: [`Hold::record`](crate::Hold::record) returns [`RecordError::Overrun`](crate::RecordError::Overrun) and records nothing when the
    /// hold and the node's lease do not cover it. With every use of a meter held this way,
    /// what is recorded never passes the limit, across the fleet.
    Refuse,
}

/// The units a route holds of its meter before its handler runs (`[[routes]] hold`), and how
/// the hold settles when the response body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteHold {
    /// The meter held.
    pub meter: MeterId,
    /// How many units.
    pub estimate: HoldEstimate,
    /// What is billed when the response ends.
    pub settle: HoldSettle,
    /// The response header (or trailer) that says how many units the work used, if the route
    /// names one (`actual_header`).
    pub actual_header: Option<http::HeaderName>,
    /// What a record beyond the hold does.
    pub overrun: Overrun,
    /// The longest the hold stays open (`hold_timeout`; `None`: `limits.hold_timeout`).
    pub timeout: Option<std::time::Duration>,
    /// A meter with dimensions: where each dimension's value comes from (`hold_values`), in
    /// the meter's order.
    pub values: Vec<(Box<str>, ValueSource)>,
}

/// How many units a route holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HoldEstimate {
    /// This many, for every request.
    Units(u64),
    /// Read from the request header `header` (a whole number of units): `default` when the
    /// request does not send it; a value that does not parse, is zero or is above `max` is
    /// answered 400 (`MalformedHoldEstimate`), nothing taken.
    Header {
        /// The header, lowercase.
        header: http::HeaderName,
        /// The units held without the header.
        default: u64,
        /// The most units a request may ask.
        max: u64,
    },
}

/// What a route's hold bills when the response ends (`settle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HoldSettle {
    /// `"actual"`, the default: what the work reported, through `TenantContext::record` on
    /// the held meter or in the route's `actual_header`; the rest goes back.
    #[default]
    Actual,
    /// `"estimate"`: the hold is billed in full (at least; what was recorded beyond it stays).
    Estimate,
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
    pub(crate) hold: Option<RouteHold>,
}

impl RouteSpec {
    /// What the route holds before its handler runs (`hold`), if it holds.
    #[must_use]
    pub fn hold(&self) -> Option<&RouteHold> {
        self.hold.as_ref()
    }

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
                Some(m) => {
                    let id = self.meter_ref(meters, &format!("{base}.meter"), m)?;
                    self.counted_alone(meters, &format!("{base}.meter"), &id)?;
                    id
                }
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
            let hold = self.route_hold(&base, r, &pattern, &reports, meters, plans)?;
            if let Some(h) = &hold {
                // A meter with dimensions is held at the values `hold_values` gives.
                let total = meters.iter().any(|m| m.id == h.meter && m.dimensions.is_some());
                if !total {
                    self.counted_alone(meters, &format!("{base}.hold"), &h.meter)?;
                }
            }
            routes.push(RouteSpec { method, pattern, meter, cost, reports, feature, hold });
        }
        if routes.iter().filter(|r| r.hold.is_some()).count() > 255 {
            return Err(self.invalid("routes", "at most 255 routes may hold"));
        }
        Ok(routes)
    }

    /// A route's `hold` and the keys that go with it.
    fn route_hold(
        &self,
        base: &str,
        r: &RawRoute,
        pattern: &RoutePattern,
        reports: &[MeterId],
        meters: &[MeterSpec],
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<Option<RouteHold>, ConfigError> {
        let Some((name, raw)) = r.hold.iter().next() else {
            for (key, set) in [
                ("hold_values", !r.hold_values.is_empty()),
                ("actual_header", r.actual_header.is_some()),
                ("settle", r.settle.is_some()),
                ("overrun", r.overrun.is_some()),
                ("hold_timeout", r.hold_timeout.is_some()),
            ] {
                if set {
                    return Err(self.invalid(&format!("{base}.{key}"), "only used with `hold`"));
                }
            }
            return Ok(None);
        };
        let path = format!("{base}.hold.{name}");
        if r.hold.len() > 1 {
            return Err(self.invalid(&format!("{base}.hold"), "a route holds one meter"));
        }
        let meter = reports.iter().find(|m| m.as_str() == name).cloned().ok_or_else(|| {
            self.invalid(
                &path,
                format!("`{name}` is not in this route's `reports`: a route holds a meter its handler reports"),
            )
        })?;
        // A hold holds the meter's units against a hard quota or a balance, or their cost
        // against a spend cap on a plan that prices the meter (a tenant's own hard cap may
        // hold it on a plan whose cap is soft).
        // A meter with dimensions: its series (priced), and the meters a hold of one holds.
        let family: Vec<&MeterSpec> =
            meters.iter().filter(|m| m.id == meter || m.of.as_ref() == Some(&meter)).collect();
        let priced = |p: &PlanSpec| {
            family.iter().any(|m| p.prices.get(&m.id).copied().or(m.price).is_some_and(|price| !price.is_zero()))
        };
        let limited = plans.values().any(|p| {
            family
                .iter()
                .any(|m| p.quotas.get(&m.id).is_some_and(|q| q.mode == QuotaMode::Hard || q.period == Period::Prepaid))
                || (p.spend_max.is_some() && priced(p))
        });
        if !limited {
            return Err(self.invalid(
                &path,
                format!(
                    "no plan has a hard quota or a prepaid balance on `{meter}`, or a spend cap and a price for it: \
                     the hold would hold nothing"
                ),
            ));
        }
        let units = |key: &str, n: i64| -> Result<u64, ConfigError> {
            u64::try_from(n).ok().filter(|n| (1..=crate::base::LEASE_MAX).contains(n)).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("must be a whole number of units from 1 to {}, not {n}", crate::base::LEASE_MAX),
                )
            })
        };
        let estimate = match raw {
            RawHold::Units(n) => HoldEstimate::Units(units(&path, *n)?),
            RawHold::Header(h) => {
                let header = http::HeaderName::try_from(h.header.as_str()).map_err(|_| {
                    self.invalid(&format!("{path}.header"), format!("`{}` is not a valid header name", h.header))
                })?;
                let default = units(&format!("{path}.default"), h.default)?;
                let max = units(&format!("{path}.max"), h.max)?;
                if max < default {
                    return Err(
                        self.invalid(&format!("{path}.max"), format!("{max} is below the `default` of {default}"))
                    );
                }
                HoldEstimate::Header { header, default, max }
            }
        };
        let settle = match r.settle.as_deref() {
            None | Some("actual") => HoldSettle::Actual,
            Some("estimate") => HoldSettle::Estimate,
            Some(other) => {
                return Err(self
                    .invalid(&format!("{base}.settle"), format!("expected \"actual\" or \"estimate\", not `{other}`")))
            }
        };
        let actual_header = match &r.actual_header {
            None => None,
            Some(_) if settle == HoldSettle::Estimate => {
                return Err(self.invalid(
                    &format!("{base}.actual_header"),
                    "settle = \"estimate\" bills the estimate: the header would not be read",
                ))
            }
            Some(h) => Some(http::HeaderName::try_from(h.as_str()).map_err(|_| {
                self.invalid(&format!("{base}.actual_header"), format!("`{h}` is not a valid header name"))
            })?),
        };
        let overrun = match r.overrun.as_deref() {
            None | Some("debt") => Overrun::Debt,
            Some("refuse") => Overrun::Refuse,
            Some(other) => {
                return Err(
                    self.invalid(&format!("{base}.overrun"), format!("expected \"debt\" or \"refuse\", not `{other}`"))
                )
            }
        };
        let timeout = match &r.hold_timeout {
            None => None,
            Some(t) => {
                let key = format!("{base}.hold_timeout");
                let d = self.duration(&key, Some(t), std::time::Duration::ZERO)?;
                if d < std::time::Duration::from_secs(1) || d > super::limits::MAX_HOLD_TIMEOUT {
                    return Err(self.invalid(&key, "must be from 1s to 24h"));
                }
                Some(d)
            }
        };
        let values = self.hold_values(base, &meter, &r.hold_values, meters, pattern)?;
        Ok(Some(RouteHold { meter, estimate, settle, actual_header, overrun, timeout, values }))
    }

    /// A route hold's `hold_values`: each a dimension of the held meter, its value written (in
    /// the dimension's list) or read from a header; every dimension given, unless the meter
    /// counts unknown values under `other`.
    fn hold_values(
        &self,
        base: &str,
        meter: &MeterId,
        raw: &BTreeMap<String, RawValue>,
        meters: &[MeterSpec],
        pattern: &RoutePattern,
    ) -> Result<Vec<(Box<str>, ValueSource)>, ConfigError> {
        let key = format!("{base}.hold_values");
        let dims = meters.iter().find(|m| m.id == *meter).and_then(|m| m.dimensions.clone());
        let Some(dims) = dims else {
            if let Some(n) = raw.keys().next() {
                return Err(self.invalid(&format!("{key}.{n}"), format!("`{meter}` has no dimensions")));
            }
            return Ok(Vec::new());
        };
        if let Some(n) = raw.keys().find(|n| !dims.names().any(|d| d == n.as_str())) {
            return Err(self.invalid(&format!("{key}.{n}"), format!("`{meter}` has no dimension `{n}`")));
        }
        let mut out = Vec::with_capacity(raw.len());
        for name in dims.names() {
            let at = format!("{key}.{name}");
            let source = match raw.get(name) {
                None if dims.on_unknown == super::OnUnknownValue::Other => continue,
                None => {
                    return Err(self.invalid(
                        &key,
                        format!(
                            "the hold of `{meter}` needs a value of `{name}`: written, read from a header \
                             ({name} = {{ header = \"x-{name}\" }}) or from the path ({name} = {{ path = \"{name}\" }})"
                        ),
                    ))
                }
                Some(RawValue::Value(v)) => {
                    if !dims.values(name).is_some_and(|mut l| l.any(|x| x == v.as_str())) {
                        return Err(self.invalid(&at, format!("`{v}` is not a value of the dimension `{name}`")));
                    }
                    ValueSource::Value(v.as_str().into())
                }
                Some(RawValue::From(RawValueFrom { header: Some(header), path: None })) => {
                    ValueSource::Header(http::HeaderName::try_from(header.as_str()).map_err(|_| {
                        self.invalid(&format!("{at}.header"), format!("`{header}` is not a valid header name"))
                    })?)
                }
                Some(RawValue::From(RawValueFrom { header: None, path: Some(param) })) => {
                    let segment = pattern.param_segment(param).ok_or_else(|| {
                        self.invalid(
                            &format!("{at}.path"),
                            format!(
                                "the route's path `{}` has no {{{param}}} segment (a {{*rest}} is not one segment)",
                                pattern.as_str()
                            ),
                        )
                    })?;
                    ValueSource::Path { name: param.as_str().into(), segment }
                }
                Some(RawValue::From(_)) => {
                    return Err(self.invalid(
                        &at,
                        "a value is written (\"output\"), or read from one place: { header = \"x-NAME\" } or \
                         { path = \"PARAM\" }",
                    ))
                }
            };
            out.push((Box::from(name), source));
        }
        Ok(out)
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
        for plan in plans.values() {
            for (meter, quota) in &plan.quotas {
                if quota.mode == QuotaMode::Hard && !enforced(meter, default_meter, routes, events) {
                    return Err(self.invalid(
                        &format!("plans.{}.quotas.{meter}", plan.table),
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

/// Whether some request or event would be refused by a hard quota on `meter`: a route charges
/// or reports it, an event product records it, it is the default meter, or it is the spend
/// meter (fed by every priced meter, never charged by a route itself).
pub(super) fn enforced(meter: &MeterId, default_meter: &MeterId, routes: &[RouteSpec], events: &EventSettings) -> bool {
    // A series or a selector of a meter with dimensions is held where its meter is reported
    // (`hold_in` refuses it).
    if let Some((total, _)) = meter.as_str().split_once('{') {
        return enforced(&MeterId::new(total), default_meter, routes, events);
    }
    meter.as_str() == crate::base::SPEND_METER
        || meter == default_meter
        || routes.iter().any(|r| &r.meter == meter || r.reports.contains(meter))
        || events.products.values().any(|e| e == meter)
}
