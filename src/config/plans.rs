//! `[plans.<name>]` and tenants' overrides of them: rates, bursts, quotas and features.

use std::{collections::BTreeMap, num::NonZeroU32};

use serde::Deserialize;

use super::quota::{RawQuota, RawSpend};
use super::{validator::check_name, validator::Validator, MeterSpec, QuotaSpec, Rate, StoreErrorPolicy};
use super::{ConfigError, ConfigErrorKind as Kind};
use crate::base::{MeterId, Period, PlanId, QuotaMode};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlan {
    pub(crate) rate: Option<String>,
    pub(crate) burst: Option<i64>,
    pub(crate) on_store_error: Option<String>,
    #[serde(default)]
    pub(crate) quotas: BTreeMap<String, RawQuota>,
    #[serde(default)]
    pub(crate) features: Vec<String>,
    pub(crate) shadow: Option<bool>,
    pub(crate) billed: Option<bool>,
    pub(crate) concurrency: Option<i64>,
    pub(crate) rate_scope: Option<String>,
    pub(crate) concurrency_scope: Option<String>,
    pub(crate) tenant_alerts: Option<bool>,
    #[serde(default)]
    pub(crate) prices: BTreeMap<String, String>,
    pub(crate) spend: Option<RawSpend>,
    #[serde(default)]
    pub(crate) recharge: BTreeMap<String, super::recharge::RawRecharge>,
    /// The plan's version (`version = 2`); 1 when unset.
    pub(crate) version: Option<i64>,
    /// Earlier versions still served to the tenants put on them (`[plans.NAME.versions.1]`).
    #[serde(default)]
    pub(crate) versions: BTreeMap<String, RawPlan>,
}

/// A tenant's overrides of its plan: in the TOML (`[tenants.X.overrides]`), and as JSON in the
/// store's directory (the same keys).
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOverride {
    pub(crate) rate: Option<String>,
    pub(crate) burst: Option<i64>,
    pub(crate) rate_scope: Option<String>,
    #[serde(default)]
    pub(crate) quotas: BTreeMap<String, RawQuota>,
    #[serde(default)]
    pub(crate) features: Vec<String>,
    #[serde(default)]
    pub(crate) prices: BTreeMap<String, String>,
    pub(crate) spend: Option<RawSpend>,
}

/// A plan: a rate with its burst, and quotas per meter.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    pub(crate) id: PlanId,
    pub(crate) rate: Option<Rate>,
    pub(crate) burst: NonZeroU32,
    pub(crate) on_store_error: Option<StoreErrorPolicy>,
    pub(crate) quotas: BTreeMap<MeterId, QuotaSpec>,
    pub(crate) features: std::collections::BTreeSet<String>,
    pub(crate) shadow: bool,
    pub(crate) billed: bool,
    pub(crate) concurrency: Option<NonZeroU32>,
    pub(crate) rate_scope: Scope,
    pub(crate) concurrency_scope: Scope,
    pub(crate) tenant_alerts: bool,
    /// Prices per meter that this plan sets (`prices.METER`), over the meters' own.
    pub(crate) prices: BTreeMap<MeterId, rust_decimal::Decimal>,
    /// The most a tenant may set its spend cap to (`spend.max_limit`), in nano-units; `None`
    /// without a spend cap.
    pub(crate) spend_max: Option<u64>,
    /// The prepaid meters this plan allows auto-recharge of (`recharge.METER`), with their
    /// bounds.
    pub(crate) recharge: BTreeMap<MeterId, super::RechargeSpec>,
    /// Which version of its plan this is (1 for a plan without versions).
    pub(crate) version: u32,
    /// Whether this is the plan's current version, the one tenants are put on.
    pub(crate) current: bool,
    /// The file's table of this version, under `plans.` (`pro`, `pro.versions.1`).
    pub(crate) table: String,
}

/// Whose limit a plan's `rate` or `concurrency` is (`rate_scope`, `concurrency_scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Scope {
    /// `"node"` (the default): each node keeps its own; behind a load balancer with N nodes a
    /// tenant may get N times the limit.
    #[default]
    Node,
    /// `"fleet"`: one limit per tenant for the whole fleet, in the rate or places role's store,
    /// leased out to the nodes (cells of a rate, places of a concurrency; see the
    /// configuration guide for their bounds).
    Fleet,
}

impl PlanSpec {
    /// Whose rate the plan's `rate` is: each node's, or the fleet's (`rate_scope`).
    #[must_use]
    pub fn rate_scope(&self) -> Scope {
        self.rate_scope
    }

    /// Whose count the plan's `concurrency` is: each node's, or the fleet's
    /// (`concurrency_scope`).
    #[must_use]
    pub fn concurrency_scope(&self) -> Scope {
        self.concurrency_scope
    }

    /// The prices the plan sets over its meters' own (`prices.METER`), a decimal of the
    /// currency per unit.
    #[must_use]
    pub fn prices(&self) -> &BTreeMap<MeterId, rust_decimal::Decimal> {
        &self.prices
    }

    /// The plan's spend cap, if any: its quota on the reserved meter `spend`, in nano-units of
    /// the currency (`spend.limit`).
    #[must_use]
    pub fn spend(&self) -> Option<&QuotaSpec> {
        self.spend_max.and_then(|_| self.quotas.get(crate::base::SPEND_METER))
    }

    /// The meters the plan recharges, with their recharge.
    pub fn recharges(&self) -> impl Iterator<Item = (&MeterId, &super::RechargeSpec)> {
        self.recharge.iter()
    }

    /// The plan's recharge of `meter`, if it allows one (`recharge.METER`).
    #[must_use]
    pub fn recharge(&self, meter: &MeterId) -> Option<&super::RechargeSpec> {
        self.recharge.get(meter)
    }

    /// The most a tenant may set its spend cap to, in nano-units (`spend.max_limit`, else the
    /// cap's limit).
    #[must_use]
    pub fn spend_max(&self) -> Option<u64> {
        self.spend_max
    }

    /// Whether the plan's tenants may register an endpoint of their own for their alerts
    /// (`tenant_alerts = true`): its alerts then go there too.
    #[must_use]
    pub fn tenant_alerts(&self) -> bool {
        self.tenant_alerts
    }

    /// The most requests of one tenant in flight at once on a node (`concurrency = N`),
    /// counted from admission to the end of the response body; `None`: no limit.
    #[must_use]
    pub fn concurrency(&self) -> Option<NonZeroU32> {
        self.concurrency
    }

    /// Whether the plan's tenants must be billed (`billed = true`): with a billing sink that
    /// needs a customer, the windows of such a tenant without one stay pending until it has
    /// one (within the billing system's 35 days), never written off. Tenants with a customer
    /// are billed whatever their plan; tenants of other plans without one (a free tier) are
    /// not.
    #[must_use]
    pub fn billed(&self) -> bool {
        self.billed
    }

    /// The features the plan includes (`features = ["sso"]`): a route with `feature = "sso"`
    /// refuses tenants whose plan lacks it with 403.
    #[must_use]
    pub fn features(&self) -> &std::collections::BTreeSet<String> {
        &self.features
    }

    /// Whether the plan runs in shadow mode (decisions counted, nothing refused).
    #[must_use]
    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// The plan with a tenant's overrides merged over it: the override's rate (its burst, else
    /// the rate's own count) and burst replace the plan's, its quotas replace the plan's on
    /// the same meters, its features are added.
    #[must_use]
    pub fn with_override(&self, o: &PlanOverride) -> PlanSpec {
        let mut merged = self.clone();
        if let Some(rate) = o.rate {
            merged.rate = Some(rate);
            merged.burst = o.burst.unwrap_or(rate.count());
        } else if let Some(burst) = o.burst {
            merged.burst = burst;
        }
        if let Some(scope) = o.rate_scope {
            merged.rate_scope = scope;
        }
        for (m, q) in &o.quotas {
            // A balance the plan recharges stays recharged under an override of its quota.
            let recharged = q.period == Period::Prepaid && merged.recharge.contains_key(m);
            merged.quotas.insert(m.clone(), QuotaSpec { recharged, ..q.clone() });
        }
        merged.features.extend(o.features.iter().cloned());
        for (m, p) in &o.prices {
            merged.prices.insert(m.clone(), *p);
        }
        if let Some((spend, max)) = &o.spend {
            merged.quotas.insert(crate::base::SPEND_METER.into(), spend.clone());
            merged.spend_max = Some(*max);
        }
        merged
    }

    /// The plan's id as the directory keeps it: its name for version 1, `NAME@VERSION` after
    /// ([`PlanId::at_version`]).
    #[must_use]
    pub fn id(&self) -> &PlanId {
        &self.id
    }

    /// Which version of its plan this is (`version = N`; 1 for a plan without versions).
    #[must_use]
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Whether this is its plan's current version, the one tenants are put on (an earlier
    /// version, `[plans.NAME.versions.N]`, serves the tenants still on it).
    #[must_use]
    pub fn is_current(&self) -> bool {
        self.current
    }

    /// The sustained rate, or `None` when the plan has no rate limit.
    #[must_use]
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// How many cells may be spent at once (defaults to the rate's count).
    #[must_use]
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// The plan's policy when the store cannot be reached, if it overrides the global one.
    #[must_use]
    pub fn on_store_error(&self) -> Option<StoreErrorPolicy> {
        self.on_store_error
    }

    /// The quotas of the plan, by meter.
    #[must_use]
    pub fn quotas(&self) -> &BTreeMap<MeterId, QuotaSpec> {
        &self.quotas
    }
}

/// A tenant's overrides of its plan (`[tenants.X.overrides]` in the file, or JSON with the
/// same keys in the store's directory, set with `tollgate tenants set-override`): rate,
/// burst, quotas and features, merged over the plan ([`PlanSpec::with_override`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PlanOverride {
    /// The rate instead of the plan's.
    pub rate: Option<Rate>,
    /// The burst instead of the plan's (with `rate`: else the rate's count).
    pub burst: Option<NonZeroU32>,
    /// Whose rate instead of the plan's (`rate_scope`).
    pub rate_scope: Option<Scope>,
    /// Quotas instead of the plan's on these meters (or added).
    pub quotas: BTreeMap<MeterId, QuotaSpec>,
    /// Features added to the plan's.
    pub features: std::collections::BTreeSet<String>,
    /// Prices instead of the plan's on these meters (`prices.METER`).
    pub prices: BTreeMap<MeterId, rust_decimal::Decimal>,
    /// A spend cap instead of the plan's (`spend = { … }`): its quota on the spend meter and
    /// its `max_limit`, in nano-units.
    pub spend: Option<(QuotaSpec, u64)>,
}

impl PlanOverride {
    /// The JSON form, as the store's directory keeps it.
    #[must_use]
    pub fn to_json(&self) -> String {
        let mut o = serde_json::Map::new();
        if let Some(r) = self.rate {
            o.insert("rate".into(), r.to_string().into());
        }
        if let Some(b) = self.burst {
            o.insert("burst".into(), b.get().into());
        }
        if let Some(scope) = self.rate_scope {
            o.insert("rate_scope".into(), scope_name(scope).into());
        }
        if !self.quotas.is_empty() {
            let quotas: serde_json::Map<String, serde_json::Value> = self
                .quotas
                .iter()
                .filter(|(m, _)| m.as_str() != crate::base::SPEND_METER)
                .map(|(m, q)| {
                    let mut v = serde_json::json!({
                        "period": q.period.name(),
                        "mode": match q.mode { QuotaMode::Hard => "hard", QuotaMode::Soft => "soft" },
                        "lease": q.lease.get(),
                    });
                    // A balance's limit is its grants, not a key.
                    if q.period != Period::Prepaid {
                        v["limit"] = q.limit.get().into();
                    }
                    if let Period::Month { anchor_day } = q.period {
                        v["anchor_day"] = anchor_day.into();
                    }
                    (m.to_string(), v)
                })
                .collect();
            o.insert("quotas".into(), quotas.into());
        }
        if !self.prices.is_empty() {
            let prices: serde_json::Map<String, serde_json::Value> =
                self.prices.iter().map(|(m, p)| (m.to_string(), p.to_string().into())).collect();
            o.insert("prices".into(), prices.into());
        }
        if let Some((q, max)) = &self.spend {
            let amount = |n: u64| crate::base::amount_of(n).to_string();
            let mut v = serde_json::json!({
                "limit": amount(q.limit.get()),
                "period": q.period.name(),
                "mode": match q.mode { QuotaMode::Hard => "hard", QuotaMode::Soft => "soft" },
                "max_limit": amount(*max),
            });
            if let Period::Month { anchor_day } = q.period {
                v["anchor_day"] = anchor_day.into();
            }
            o.insert("spend".into(), v);
        }
        if !self.features.is_empty() {
            o.insert("features".into(), self.features.iter().cloned().collect::<Vec<_>>().into());
        }
        serde_json::Value::Object(o).to_string()
    }

    /// Whether it changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A rate scope's name in the file.
/// The highest version a plan may have (`version`).
pub(crate) const MAX_VERSION: u32 = 1000;

/// The current version of the plan `name` among `plans` (by its name, never `NAME@N`).
pub(crate) fn current_of<'a>(plans: &'a BTreeMap<PlanId, PlanSpec>, name: &str) -> Option<&'a PlanSpec> {
    if name.contains('@') {
        return None;
    }
    plans.values().find(|p| p.current && p.id.name() == name)
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Node => "node",
        Scope::Fleet => "fleet",
    }
}

impl Validator<'_, '_> {
    /// A reference to a declared plan: its current version's id (a tenant put on it by what
    /// refers to it is put on that version).
    pub(super) fn plan_ref(
        &self,
        plans: &BTreeMap<PlanId, PlanSpec>,
        path: &str,
        name: &str,
    ) -> Result<PlanId, ConfigError> {
        if let Some(spec) = current_of(plans, name) {
            Ok(spec.id.clone())
        } else {
            Err(self.loc.error(
                Kind::UnknownReference,
                path,
                format!("unknown plan `{name}`: declare it under [plans]"),
            ))
        }
    }
    /// A scope (`rate_scope`, `concurrency_scope`) at `key`: `"node"` or `"fleet"`.
    fn rate_scope(&self, key: &str, raw: Option<&str>) -> Result<Option<Scope>, ConfigError> {
        match raw {
            None => Ok(None),
            Some("node") => Ok(Some(Scope::Node)),
            Some("fleet") => Ok(Some(Scope::Fleet)),
            Some(other) => Err(self.invalid(key, format!("expected \"node\" or \"fleet\", not \"{other}\""))),
        }
    }

    /// `[plans]`.
    pub(super) fn plans(
        &self,
        raw: &BTreeMap<String, RawPlan>,
        meters: &[MeterSpec],
        billing: &super::BillingSettings,
    ) -> Result<BTreeMap<PlanId, PlanSpec>, ConfigError> {
        let mut plans = BTreeMap::new();
        for (name, p) in raw {
            check_name(self, &format!("plans.{name}"), name)?;
            let version = match p.version {
                None => 1,
                Some(v) => u32::try_from(v).ok().filter(|v| (1..=MAX_VERSION).contains(v)).ok_or_else(|| {
                    self.invalid(&format!("plans.{name}.version"), format!("a version is 1 to {MAX_VERSION}, not {v}"))
                })?,
            };
            for (key, old) in &p.versions {
                let table = format!("{name}.versions.{key}");
                let v = key.parse::<u32>().ok().filter(|v| (1..version).contains(v)).ok_or_else(|| {
                    let why = if version == 1 {
                        "the plan has no earlier version: the plan's `version` is 1 (give it `version = 2` and keep \
                         its old table here as version 1)"
                            .to_owned()
                    } else {
                        format!(
                            "an earlier version of the plan is named by its number, 1 to {} (the plan's `version` is \
                             {version}), not `{key}`",
                            version - 1
                        )
                    };
                    self.invalid(&format!("plans.{table}"), why)
                })?;
                if old.version.is_some() || !old.versions.is_empty() {
                    let inner = if old.version.is_some() { "version" } else { "versions" };
                    return Err(self.invalid(
                        &format!("plans.{table}.{inner}"),
                        "an earlier version is numbered by its key and holds no versions of its own",
                    ));
                }
                let id = PlanId::at_version(name, v);
                plans.insert(id.clone(), self.plan(&table, id, v, false, old, meters, billing)?);
            }
            let id = PlanId::at_version(name, version);
            plans.insert(id.clone(), self.plan(name, id, version, true, p, meters, billing)?);
        }
        Ok(plans)
    }

    /// Prices per meter at `base.prices` (each meter declared).
    fn prices(
        &self,
        base: &str,
        raw: &BTreeMap<String, String>,
        meters: &[MeterSpec],
        billing: &super::BillingSettings,
    ) -> Result<BTreeMap<MeterId, rust_decimal::Decimal>, ConfigError> {
        let mut prices = BTreeMap::new();
        for (meter, text) in raw {
            let key = format!("{base}.prices.{}", super::dimensions::key_segment(meter));
            let id = self.meter_ref(meters, &key, meter)?;
            if id.as_str() == crate::base::SPEND_METER {
                return Err(self.invalid(&key, "the spend meter is money already: it has no price"));
            }
            // Only what is billed is priced: a series, not its total or a selector over several.
            if meters.iter().any(|m| m.id == id && (m.dimensions.is_some() || (m.of.is_some() && !m.is_series()))) {
                return Err(self.invalid(
                    &key,
                    "a meter with dimensions is priced per series: name each one (`tokens{model=m-large,kind=output}`)",
                ));
            }
            if prices.contains_key(&id) {
                return Err(self.invalid(&key, format!("names `{id}`, as another key of these prices does")));
            }
            prices.insert(id, self.price(&key, text, billing)?);
        }
        Ok(prices)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn plan(
        &self,
        table: &str,
        id: PlanId,
        version: u32,
        current: bool,
        p: &RawPlan,
        meters: &[MeterSpec],
        billing: &super::BillingSettings,
    ) -> Result<PlanSpec, ConfigError> {
        let base = format!("plans.{table}");
        let rate = match &p.rate {
            None => None,
            Some(r) => Some(
                r.parse::<Rate>().map_err(|e| self.invalid(&format!("{base}.rate"), format!("{e}, not \"{r}\"")))?,
            ),
        };
        let burst = match (p.burst, rate) {
            (Some(b), _) => {
                let b = u32::try_from(b).ok().and_then(NonZeroU32::new);
                b.ok_or_else(|| self.invalid(&format!("{base}.burst"), "must be a whole number from 1 to 4294967295"))?
            }
            (None, Some(rate)) => rate.count(),
            (None, None) => NonZeroU32::MAX,
        };
        if p.burst.is_some() && rate.is_none() {
            return Err(self.invalid(&format!("{base}.burst"), "a burst needs a rate"));
        }
        let rate_scope = self.rate_scope(&format!("{base}.rate_scope"), p.rate_scope.as_deref())?.unwrap_or_default();
        if rate_scope == Scope::Fleet && rate.is_none() {
            return Err(self.invalid(&format!("{base}.rate_scope"), "a fleet rate needs a rate"));
        }
        let concurrency_scope =
            self.rate_scope(&format!("{base}.concurrency_scope"), p.concurrency_scope.as_deref())?.unwrap_or_default();
        if concurrency_scope == Scope::Fleet && p.concurrency.is_none() {
            return Err(self.invalid(&format!("{base}.concurrency_scope"), "a fleet concurrency needs `concurrency`"));
        }
        let on_store_error = match &p.on_store_error {
            Some(v) => Some(self.policy(&format!("{base}.on_store_error"), v)?),
            None => None,
        };
        let mut quotas = BTreeMap::new();
        for (meter, q) in &p.quotas {
            let qbase = format!("{base}.quotas.{}", super::dimensions::key_segment(meter));
            let id = self.meter_ref(meters, &qbase, meter)?;
            if id.as_str() == crate::base::SPEND_METER {
                return Err(self.invalid(&qbase, "spend is capped with `spend = { limit = … }`, in money"));
            }
            if quotas.contains_key(&id) {
                return Err(self.invalid(&qbase, format!("names `{id}`, as another key of these quotas does")));
            }
            quotas.insert(id, self.quota(&qbase, q)?);
        }
        let prices = self.prices(&base, &p.prices, meters, billing)?;
        let spend_max = match &p.spend {
            None => None,
            Some(raw) => {
                let (spec, max) = self.spend(&format!("{base}.spend"), raw, billing)?;
                quotas.insert(crate::base::SPEND_METER.into(), spec);
                Some(max)
            }
        };
        let features = self.features(&format!("{base}.features"), &p.features)?;
        let recharge = self.recharges(&base, &p.recharge, &quotas, billing)?;
        for meter in recharge.keys() {
            if let Some(q) = quotas.get_mut(meter) {
                q.recharged = true;
            }
        }
        Ok(PlanSpec {
            recharge,
            id,
            version,
            current,
            table: table.to_owned(),
            rate,
            burst,
            on_store_error,
            quotas,
            features,
            rate_scope,
            concurrency_scope,
            prices,
            spend_max,
            tenant_alerts: match p.tenant_alerts {
                Some(true) if !cfg!(feature = "alerts") => {
                    return Err(self.invalid(
                        &format!("{base}.tenant_alerts"),
                        "delivering alerts needs the cargo feature `alerts` (tollgate = { features = [\"alerts\"] })",
                    ))
                }
                t => t.unwrap_or(false),
            },
            shadow: p.shadow.unwrap_or(false),
            billed: p.billed.unwrap_or(false),
            concurrency: match p.concurrency {
                None => None,
                Some(n) => Some(
                    u32::try_from(n).ok().filter(|n| *n <= 1_000_000).and_then(NonZeroU32::new).ok_or_else(|| {
                        self.invalid(
                            &format!("{base}.concurrency"),
                            format!("a number of requests from 1 to 1000000, not {n}"),
                        )
                    })?,
                ),
            },
        })
    }

    /// A list of feature names: each a name (letters, digits, `-`, `_`, `.`), none twice.
    pub(super) fn features(
        &self,
        path: &str,
        raw: &[String],
    ) -> Result<std::collections::BTreeSet<String>, ConfigError> {
        let mut features = std::collections::BTreeSet::new();
        for (i, f) in raw.iter().enumerate() {
            let at = format!("{path}[{i}]");
            check_name(self, &at, f)?;
            if !features.insert(f.clone()) {
                return Err(self.invalid(&at, format!("`{f}` is listed twice")));
            }
        }
        Ok(features)
    }

    /// A tenant's overrides of its plan (`[tenants.X.overrides]`, or their JSON form).
    pub(super) fn plan_override(
        &self,
        base: &str,
        o: &RawOverride,
        meters: &[MeterSpec],
        billing: &super::BillingSettings,
    ) -> Result<PlanOverride, ConfigError> {
        let rate = match &o.rate {
            None => None,
            Some(r) => Some(
                r.parse::<Rate>().map_err(|e| self.invalid(&format!("{base}.rate"), format!("{e}, not \"{r}\"")))?,
            ),
        };
        let burst = match o.burst {
            None => None,
            Some(b) => Some(u32::try_from(b).ok().and_then(NonZeroU32::new).ok_or_else(|| {
                self.invalid(&format!("{base}.burst"), "must be a whole number from 1 to 4294967295")
            })?),
        };
        let mut quotas = BTreeMap::new();
        for (meter, q) in &o.quotas {
            let qbase = format!("{base}.quotas.{}", super::dimensions::key_segment(meter));
            let id = self.meter_ref(meters, &qbase, meter)?;
            if id.as_str() == crate::base::SPEND_METER {
                return Err(self.invalid(&qbase, "spend is capped with `spend = { limit = … }`, in money"));
            }
            if quotas.contains_key(&id) {
                return Err(self.invalid(&qbase, format!("names `{id}`, as another key of these quotas does")));
            }
            quotas.insert(id, self.quota(&qbase, q)?);
        }
        let features = self.features(&format!("{base}.features"), &o.features)?;
        let rate_scope = self.rate_scope(&format!("{base}.rate_scope"), o.rate_scope.as_deref())?;
        let prices = self.prices(base, &o.prices, meters, billing)?;
        let spend = match &o.spend {
            None => None,
            Some(raw) => Some(self.spend(&format!("{base}.spend"), raw, billing)?),
        };
        Ok(PlanOverride { rate, burst, rate_scope, quotas, features, prices, spend })
    }
}

impl Validator<'_, '_> {
    /// Every plan's recharge names a credit price of `[stripe.credits]` (`credits`: price id →
    /// units granted per unit bought; `None` without `[stripe]` or `[stripe.credits]`): its
    /// units are filled in.
    pub(super) fn recharge_prices(
        &self,
        plans: &mut BTreeMap<crate::base::PlanId, PlanSpec>,
        stripe: bool,
        credits: Option<&BTreeMap<String, u64>>,
    ) -> Result<(), ConfigError> {
        for spec in plans.values_mut() {
            for (meter, r) in &mut spec.recharge {
                let key = format!("plans.{}.recharge.{meter}", spec.table);
                if !stripe {
                    return Err(self.invalid(
                        &key,
                        "recharge charges the customer through Stripe: it needs a [stripe] section with [stripe.credits]",
                    ));
                }
                let Some(units) = credits.and_then(|c| c.get(&r.price)) else {
                    return Err(self.invalid(
                        &format!("{key}.price"),
                        format!(
                            "`{}` is not a credit price of [stripe.credits] prices: a recharge buys a price whose \
                             payment grants units (add it there, with the units one buys)",
                            r.price
                        ),
                    ));
                };
                r.pack_units = *units;
                // A recharge brings the balance to `to` and past it by less than a pack: all
                // of it must fit a balance, or the card is charged for units never granted.
                if r.to.checked_add(*units).is_none_or(|most| most > crate::base::MAX_BALANCE) {
                    return Err(self.invalid(
                        &format!("{key}.to"),
                        format!(
                            "`to` ({}) and a pack of `{}` ({units} units) pass the most a balance holds (2^50 = {} \
                             units): a recharge would charge for units that can never be granted",
                            r.to,
                            r.price,
                            crate::base::MAX_BALANCE
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
