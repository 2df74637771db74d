//! The one served-plan rule: the plan a tenant is served, with the overrides of its own that
//! fit it. Admission compiles its answer for the request path; spend caps, recharge, `Admin`,
//! the usage route and the dashboard read the same answer, so what a tenant may set is what
//! the engine holds it to.

use crate::{
    base::{PlanId, TenantId},
    config::{Config, PlanOverride, PlanSpec},
    store::{DirectoryStore, StoreError, TenantRecord},
};

/// The plan a tenant is served: its plan with the overrides that fit it.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    /// The plan with the overrides served merged in.
    pub(crate) spec: PlanSpec,
    /// The overrides served, as JSON: the record's own text when all of them fit, the part
    /// that fits when some do not, `None` when none are served.
    pub(crate) overrides: Option<String>,
    /// Why some or all of the tenant's overrides are not served (a plan change made without
    /// looking at them, or a configuration they no longer fit), if any.
    pub(crate) dropped: Option<String>,
}

/// Why a tenant cannot be served at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unserved {
    /// No such tenant, in the file nor the directory.
    UnknownTenant,
    /// Its plan is not declared in this configuration.
    UnknownPlan(PlanId),
    /// Its overrides cannot be read under this configuration (a meter or feature it does not
    /// have): the record must be mended, and serving the plan alone could drop a limit the
    /// overrides tightened.
    Unreadable(String),
}

impl std::fmt::Display for Unserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unserved::UnknownTenant => f.write_str("no such tenant"),
            Unserved::UnknownPlan(plan) => write!(f, "the plan `{plan}` is not declared"),
            Unserved::Unreadable(why) => f.write_str(why),
        }
    }
}

/// The parts of a tenant's overrides left out, in order, when the whole does not fit its plan:
/// only the parts that do not fit go, so a quota the overrides tightened stays tight when
/// their burst no longer fits.
const DROPPABLE: [&[&str]; 5] =
    [&["burst"], &["rate", "burst"], &["features"], &["quotas"], &["rate", "burst", "features"]];

/// The plan to serve `record` with: its plan with its overrides; when the overrides do not
/// fit the plan, the plan with the part of them that fits (or alone), with why.
///
/// # Errors
/// [`Unserved::UnknownPlan`], [`Unserved::Unreadable`].
pub(crate) fn served(config: &Config, record: &TenantRecord) -> Result<Served, Unserved> {
    let Some(base) = config.plan(&record.plan) else { return Err(Unserved::UnknownPlan(record.plan.clone())) };
    let json = record.overrides.as_deref().filter(|o| !o.trim().is_empty());
    let why = match fit(config, base, json) {
        Ok((spec, overrides)) => return Ok(Served { spec, overrides, dropped: None }),
        Err(why) => why,
    };
    // Overrides that no longer fit: readable ones lose the parts that do not fit.
    let Some(json) = json.filter(|json| PlanOverride::from_json(json, config).is_ok()) else {
        return Err(Unserved::Unreadable(why));
    };
    if let Ok(serde_json::Value::Object(all)) = serde_json::from_str::<serde_json::Value>(json) {
        for drop in DROPPABLE {
            if !drop.iter().any(|k| all.contains_key(*k)) {
                continue;
            }
            let mut kept = all.clone();
            kept.retain(|k, _| !drop.contains(&k.as_str()));
            let kept = serde_json::Value::Object(kept).to_string();
            if let Ok((spec, overrides)) = fit(config, base, Some(&kept)) {
                let dropped = format!("{why}; served without its `{}`", drop.join("`, `"));
                return Ok(Served { spec, overrides, dropped: Some(dropped) });
            }
        }
    }
    Ok(Served { spec: base.clone(), overrides: None, dropped: Some(why) })
}

/// `base` with the overrides `json` merged, when they fit it: with the overrides served
/// (`None`: none, or none that change anything).
fn fit(config: &Config, base: &PlanSpec, json: Option<&str>) -> Result<(PlanSpec, Option<String>), String> {
    let Some(json) = json else { return Ok((base.clone(), None)) };
    let o = PlanOverride::from_json(json, config).map_err(|e| e.to_string())?;
    if o.is_empty() {
        return Ok((base.clone(), None));
    }
    config.check_override(base.id(), &o)?;
    Ok((base.with_override(&o), Some(json.to_owned())))
}

/// The tenant `tenant` as the configuration file declares it (`[tenants.ID]`), as a record.
pub(crate) fn file_record(config: &Config, tenant: &TenantId) -> Option<TenantRecord> {
    let spec = config.tenants().iter().find(|t| t.id() == tenant)?;
    let mut record = TenantRecord::new(spec.id().clone(), spec.plan().clone());
    if let Some(c) = spec.stripe_customer() {
        record = record.with_customer(c);
    }
    if let Some(c) = spec.metronome_customer() {
        record = record.with_metronome_customer(c);
    }
    record.overrides = spec.overrides().map(PlanOverride::to_json);
    Some(record)
}

/// `tenant`'s record (the file's first, else the directory's) and the plan it is served.
///
/// # Errors
/// The directory's; inside, why the tenant cannot be served.
pub(crate) async fn served_tenant(
    directory: &dyn DirectoryStore,
    config: &Config,
    tenant: &TenantId,
) -> Result<Result<(TenantRecord, Served), Unserved>, StoreError> {
    let record = match file_record(config, tenant) {
        Some(record) => record,
        None => match directory.tenant(tenant).await? {
            Some(record) => record,
            None => return Ok(Err(Unserved::UnknownTenant)),
        },
    };
    Ok(served(config, &record).map(|served| (record, served)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[billing]
currency = "usd"
[meters.tokens]
[plans.pro]
rate = "100/s"
quotas.tokens = { limit = 1000, period = "month" }
spend = { limit = "1.00", period = "month", mode = "hard", max_limit = "10.00" }
[plans.norate]
[[routes]]
path = "/generate"
reports = ["tokens"]
[tenants.f]
plan = "pro"
keys = ["key-f"]
overrides = { burst = 500 }
"#;

    fn record(plan: &str, overrides: Option<&str>) -> TenantRecord {
        let mut r = TenantRecord::new("t".into(), plan.into());
        r.overrides = overrides.map(str::to_owned);
        r
    }

    #[test]
    fn overrides_that_fit_are_served_whole_and_blank_ones_are_none() {
        let config = Config::from_toml_str(TOML).unwrap();
        let s = served(&config, &record("pro", Some(r#"{"burst": 300}"#))).unwrap();
        assert_eq!((s.spec.burst().get(), s.overrides.as_deref(), s.dropped), (300, Some(r#"{"burst": 300}"#), None));
        for blank in [None, Some(""), Some("  "), Some("{}")] {
            let s = served(&config, &record("pro", blank)).unwrap();
            assert_eq!((s.overrides, s.dropped), (None, None), "{blank:?}");
        }
    }

    #[test]
    fn only_the_part_that_does_not_fit_is_dropped_and_unreadable_ones_are_refused() {
        let config = Config::from_toml_str(TOML).unwrap();
        // A burst over a plan without a rate goes; the tightened quota stays.
        let s = served(
            &config,
            &record("norate", Some(r#"{"burst": 50, "quotas": {"tokens": {"limit": 5, "period": "day"}}}"#)),
        )
        .unwrap();
        assert!(s.dropped.as_deref().unwrap().contains("served without its `burst`"), "{:?}", s.dropped);
        assert_eq!(s.spec.quotas().get(&crate::base::MeterId::from("tokens")).map(|q| q.limit().get()), Some(5));
        // A fleet rate without `limits.fleet_size_hint`: nothing droppable fits, the plan alone.
        let fleet = r#"{"rate_scope": "fleet", "spend": {"limit": "5.00", "period": "month", "mode": "hard", "max_limit": "50.00"}}"#;
        let s = served(&config, &record("pro", Some(fleet))).unwrap();
        assert_eq!(s.overrides, None);
        assert!(s.dropped.is_some());
        assert_eq!(s.spec.spend_max(), Some(10 * crate::base::NANOS), "the plan's own maximum");
        // A meter this configuration does not have: not served at all.
        let e = served(&config, &record("pro", Some(r#"{"quotas": {"images": {"limit": 5, "period": "day"}}}"#)));
        assert!(matches!(e, Err(Unserved::Unreadable(_))), "{e:?}");
        assert_eq!(served(&config, &record("gone", None)).unwrap_err().to_string(), "the plan `gone` is not declared");
    }

    #[test]
    fn a_file_tenant_is_read_as_its_record() {
        let config = Config::from_toml_str(TOML).unwrap();
        let r = file_record(&config, &"f".into()).unwrap();
        assert_eq!(r.plan.as_str(), "pro");
        assert_eq!(served(&config, &r).unwrap().spec.burst().get(), 500);
        assert!(file_record(&config, &"t".into()).is_none());
    }
}
