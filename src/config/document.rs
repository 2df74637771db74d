//! The whole document: the raw file, its validation from the top, and the [`Config`] it gives.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use super::{
    alerts::RawAlerts, events::RawEvents, export::RawExport, identify::RawIdentify, limits::RawLimits,
    limits::HEADERS_ALLOWANCE, located::serde_error, located::syntax_error, located::Located, meters::RawMeter,
    metronome::RawMetronome, plans::RawOverride, plans::RawPlan, routes::RawRoute, store::RawStore, store::StoreOrigin,
    store::StoreRoles, stripe::RawStripe, tenants::RawTenant, usage::RawUsage, validator::Validator, ClientSettings,
    EventSettings, ExportSettings, Identify, Limits, MeterAggregation, MeterSpec, MetronomeSettings, OnUnknown,
    PlanOverride, PlanSpec, RouteSpec, StoreRole, StoreSettings, StripeSettings, TenantSpec, UsageSettings,
    ANONYMOUS_TENANT,
};
use super::{ConfigError, ConfigErrorKind, ConfigErrorKind as Kind};
use crate::base::{MeterId, PlanId, QuotaMode, SinkKind};

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) identify: RawIdentify,
    #[serde(default)]
    pub(crate) limits: RawLimits,
    #[serde(default)]
    pub(crate) usage: RawUsage,
    #[serde(default)]
    pub(crate) meters: BTreeMap<String, RawMeter>,
    #[serde(default)]
    pub(crate) plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(crate) orgs: BTreeMap<String, super::orgs::RawOrg>,
    #[serde(default)]
    pub(crate) tiers: BTreeMap<String, super::tiers::RawTier>,
    #[serde(default)]
    pub(crate) tenants: BTreeMap<String, RawTenant>,
    pub(crate) store: Option<RawStore>,
    #[serde(default)]
    pub(crate) export: RawExport,
    pub(crate) stripe: Option<RawStripe>,
    pub(crate) metronome: Option<RawMetronome>,
    #[serde(default)]
    pub(crate) events: RawEvents,
    #[serde(default)]
    pub(crate) alerts: RawAlerts,
    pub(crate) billing: Option<super::billing::RawBilling>,
    #[serde(default)]
    pub(crate) dashboard: super::dashboard::RawDashboard,
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => return Err(syntax_error(text, &e)),
    };
    if root.get_ref().is_empty() {
        // A file that declares nothing is more likely a wrong path or a truncated file than a
        // deliberate configuration with no plans (which any key at all still allows).
        return Err(ConfigError::new(
            Kind::InvalidValue,
            "",
            "the file declares nothing (no plans, meters, routes or tenants): \
             an empty configuration is rejected rather than taken to mean \"reject everyone\"",
        )
        .at(Some((1, 1))));
    }
    let loc = Located { text, root: Some(DeValue::Table(root.get_ref().clone())) };
    let raw: RawConfig = {
        let de = toml::Deserializer::from(root);
        serde_path_to_error::deserialize(de).map_err(|e| serde_error(&loc, e))?
    };
    Validator { loc: &loc }.config(raw)
}

/// A parsed and validated configuration.
///
/// ```
/// let config = tollgate::Config::from_toml_str(r#"
///     [plans.free]
///     rate = "10/s"
///     burst = 20
///     quotas.requests = { limit = 1000, period = "day", mode = "hard" }
///
///     [tenants.acme]
///     plan = "free"
///     keys = ["tg_test_acme"]
/// "#).unwrap();
/// assert_eq!(config.plans().len(), 1);
/// assert_eq!(config.plan(&"free".into()).unwrap().burst().get(), 20);
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) identify: Identify,
    pub(crate) on_unknown: OnUnknown,
    pub(crate) limits: Limits,
    pub(crate) usage: UsageSettings,
    pub(crate) meters: Vec<MeterSpec>,
    pub(crate) default_meter: MeterId,
    pub(crate) plans: BTreeMap<PlanId, PlanSpec>,
    pub(crate) routes: Vec<RouteSpec>,
    pub(crate) orgs: BTreeMap<crate::base::OrgId, super::OrgSpec>,
    pub(crate) tiers: Vec<super::TierSpec>,
    pub(crate) tenants: Vec<TenantSpec>,
    pub(crate) store: StoreSettings,
    /// The stores of the roles that have one of their own (`[store.directory]` and the others).
    pub(crate) store_roles: StoreRoles,
    pub(crate) export: ExportSettings,
    pub(crate) stripe: Option<StripeSettings>,
    pub(crate) metronome: Option<MetronomeSettings>,
    pub(crate) events: EventSettings,
    pub(crate) alerts: super::AlertSettings,
    pub(crate) billing: super::BillingSettings,
    pub(crate) dashboard: super::DashboardSettings,
    pub(crate) clients: ClientSettings,
    /// Whether the file has a `[store]` section, and where its keys are (for reload errors).
    pub(crate) store_written: Option<StoreOrigin>,
    /// The file the configuration was read from.
    pub(crate) file: Option<std::path::PathBuf>,
}

impl Config {
    /// Reads and validates the TOML file at `path`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, line, column and key of the first problem.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(ConfigErrorKind::Io, "", format!("cannot read the file: {e}"))
                .in_file(Some(path.to_owned()))
        })?;
        let mut config = parse(&text).map_err(|e| e.in_file(Some(path.to_owned())))?;
        config.file = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates a TOML document.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the line, column and key of the first problem.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        parse(text)
    }

    /// The currency of prices and spend caps (`[billing]`).
    pub fn billing(&self) -> &super::BillingSettings {
        &self.billing
    }

    /// Where alerts go and how they are delivered (`[alerts]`).
    pub fn alerts(&self) -> &super::AlertSettings {
        &self.alerts
    }

    /// The operator dashboard's access token (`[dashboard]`).
    pub fn dashboard(&self) -> &super::DashboardSettings {
        &self.dashboard
    }

    /// How tenants are identified.
    pub fn identify(&self) -> &Identify {
        &self.identify
    }

    /// What a request with a missing or unknown tenant gets.
    pub fn on_unknown(&self) -> &OnUnknown {
        &self.on_unknown
    }

    /// Memory bounds and header style.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Usage aggregation, flushing and billing settings.
    pub fn usage(&self) -> &UsageSettings {
        &self.usage
    }

    /// The declared meters (`requests` always exists).
    pub fn meters(&self) -> &[MeterSpec] {
        &self.meters
    }

    /// The meter charged by requests that match no route.
    pub fn default_meter(&self) -> &MeterId {
        &self.default_meter
    }

    /// The plans, by the id the directory keeps ([`PlanSpec::id`]): each plan's current
    /// version, and its earlier versions the file still declares (`[plans.NAME.versions.N]`).
    pub fn plans(&self) -> &BTreeMap<PlanId, PlanSpec> {
        &self.plans
    }

    /// The plan a tenant the directory puts on `id` is served: that version of the plan when
    /// the file declares it, else the plan's current version (a version the file no longer
    /// declares serves its tenants the current one, as a plan without versions does).
    pub fn plan(&self, id: &PlanId) -> Option<&PlanSpec> {
        self.plans.get(id).or_else(|| super::plans::current_of(&self.plans, id.name()))
    }

    /// The plan a tenant on `from` moves to when an event names `to` (a subscription's plan, a
    /// tier): `from` itself when `to` is a version of the same plan (a renewal keeps the
    /// tenant's version); else `to`'s current version, whatever version `to` names (a plan the
    /// tenant is not on is always put on as it is now: the version a subscription gave when it
    /// began may be long replaced).
    #[cfg(feature = "stripe")]
    pub(crate) fn moved_to(&self, from: &PlanId, to: PlanId) -> PlanId {
        if from.same_plan(&to) {
            return from.clone();
        }
        super::plans::current_of(&self.plans, to.name()).map_or(to, |p| p.id().clone())
    }

    /// The version a tenant is put on when moved to `plan`: for a plan's name, its current
    /// version; for a version's id (`pro@2`, or `pro` for version 1 of a plan with versions),
    /// that version if the file declares it. `None`: no such plan or version.
    pub fn put_on(&self, plan: &str) -> Option<&PlanSpec> {
        match plan.split_once('@') {
            None => super::plans::current_of(&self.plans, plan),
            Some((name, version)) => {
                let version = version.parse::<u32>().ok().filter(|v| *v >= 1 && !version.starts_with('0'))?;
                self.plans.get(&PlanId::at_version(name, version))
            }
        }
    }

    /// The plans whose limits this configuration changes from `before` without a new
    /// version: each version both declare (by its id) whose settings differ. Their tenants
    /// move to the new limits at once, as they did before plans had versions;
    /// [`Tollgate::reload`](crate::Tollgate::reload) says so in its log. A plan that keeps
    /// its tenants on their limits gets a new `version`, its old table under
    /// `[plans.NAME.versions.N]`.
    #[must_use]
    pub fn changed_without_version(&self, before: &Config) -> Vec<PlanId> {
        let settings = |p: &PlanSpec| {
            let mut p = p.clone();
            (p.current, p.table) = (false, String::new());
            format!("{p:?}")
        };
        self.plans
            .iter()
            .filter(|(id, p)| before.plans.get(*id).is_some_and(|b| settings(b) != settings(p)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether `plan` with the overrides `o` merged over it holds as a plan must: every
    /// route's cost within its burst, and each hard quota on a meter that requests are
    /// charged, a route reports or events record.
    ///
    /// # Errors
    /// What does not hold.
    pub fn check_override(&self, plan: &PlanId, o: &PlanOverride) -> Result<(), String> {
        let Some(base) = self.plan(plan) else {
            return Err(format!("no plan `{plan}`"));
        };
        let merged = base.with_override(o);
        if o.burst.is_some() && merged.rate.is_none() {
            return Err("a burst needs a rate (the plan has none, and the overrides set none)".into());
        }
        if let Some((_, why)) = fleet_without_hint(&merged, &self.usage, &self.limits) {
            return Err(why);
        }
        if let Some((_, why)) = minute_past_skew(&o.quotas, &self.limits) {
            return Err(why);
        }
        if merged.rate_scope == super::Scope::Fleet && merged.rate.is_none() {
            return Err("a fleet rate needs a rate (the plan has none, and the overrides set none)".into());
        }
        if merged.rate.is_some() {
            if let Some(r) = self.routes.iter().find(|r| r.cost > merged.burst) {
                return Err(format!(
                    "the route {} costs {} and the overridden burst is {}: no request could ever pass",
                    r.path(),
                    r.cost,
                    merged.burst
                ));
            }
        }
        for (meter, q) in &merged.quotas {
            if q.mode == QuotaMode::Hard
                && !super::routes::enforced(meter, &self.default_meter, &self.routes, &self.events)
            {
                return Err(format!(
                    "a hard quota on `{meter}`, but no route charges or reports it and no event product records it"
                ));
            }
        }
        Ok(())
    }

    /// The route rules, in the order they are matched (the first match wins).
    pub fn routes(&self) -> &[RouteSpec] {
        &self.routes
    }

    /// The tenants declared in the file.
    pub fn tenants(&self) -> &[TenantSpec] {
        &self.tenants
    }

    /// The organizations declared in the file (`[orgs.NAME]`), by name.
    pub fn orgs(&self) -> &BTreeMap<crate::base::OrgId, super::OrgSpec> {
        &self.orgs
    }

    /// The ladders of plans declared in the file (`[tiers.NAME]`), in the order of their names.
    #[must_use]
    pub fn tiers(&self) -> &[super::TierSpec] {
        &self.tiers
    }

    /// The ladder `plan` is on, if any (a plan is on one at most).
    #[must_use]
    pub fn tier_of(&self, plan: &PlanId) -> Option<&super::TierSpec> {
        self.tiers.iter().find(|t| t.plans.iter().any(|p| p.same_plan(plan)))
    }

    /// Whether `meter`'s usage is exported: `[meters.X] export`, `true` for a meter the
    /// configuration does not declare.
    #[must_use]
    pub fn exports_meter(&self, meter: &MeterId) -> bool {
        // A series no longer declared follows its meter's `export`.
        let family = meter.as_str().split_once('{').map(|(f, _)| f);
        self.meters
            .iter()
            .find(|m| &m.id == meter)
            .or_else(|| self.meters.iter().find(|m| Some(m.id.as_str()) == family))
            .is_none_or(MeterSpec::exported)
    }

    /// How closed windows are exported (`[export]`).
    pub fn export(&self) -> &ExportSettings {
        &self.export
    }

    /// How client addresses are read for anonymous callers.
    pub fn clients(&self) -> &ClientSettings {
        &self.clients
    }

    /// How usage events from jobs and queues are taken (`[events]`).
    pub fn events(&self) -> &EventSettings {
        &self.events
    }

    /// Stripe's settings, if the file has a `[stripe]` section.
    pub fn stripe(&self) -> Option<&StripeSettings> {
        self.stripe.as_ref()
    }

    /// Whether the sink the configuration names needs a billing customer (Stripe and
    /// Metronome do; a file does not), for an engine built without a sink.
    pub(crate) fn sink_needs_customer(&self) -> bool {
        matches!(self.export.sink_kind(self.stripe.is_some()), Some(SinkKind::Stripe | SinkKind::Metronome))
    }

    /// `[metronome]`, if present.
    #[must_use]
    pub fn metronome(&self) -> Option<&MetronomeSettings> {
        self.metronome.as_ref()
    }

    /// The file the configuration was read from, if any.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// The store the configuration names (`[store]`; SQLite in `tollgate.db` without one).
    pub fn store(&self) -> &StoreSettings {
        &self.store
    }

    /// The store of `role`: its own section (`[store.directory]`, …) if the file has one, else
    /// `[store]`'s.
    ///
    /// ```
    /// use tollgate::config::{StoreRole, StoreSettings};
    /// let config = tollgate::Config::from_toml_str(
    ///     "[store]\nkind = \"memory\"\n[store.directory]\nkind = \"sqlite\"\npath = \"directory.db\"\n",
    /// )
    /// .unwrap();
    /// assert!(matches!(config.store_of(StoreRole::Directory), StoreSettings::Sqlite { .. }));
    /// assert_eq!(config.store_of(StoreRole::Quota), &StoreSettings::Memory);
    /// ```
    pub fn store_of(&self, role: StoreRole) -> &StoreSettings {
        self.store_roles.of(role, &self.store)
    }

    /// Whether the file has a `[store]` section.
    pub fn names_store(&self) -> bool {
        self.store_written.is_some()
    }

    /// Refuses `next` as a reload of `self` when it names another store: the running store
    /// stays. The error names the file, line and key that changed.
    pub(crate) fn check_same_store(&self, next: &Config) -> Result<(), ConfigError> {
        if self.store == next.store {
            // A role's own store cannot change either.
            let Some(role) = StoreRole::ALL.into_iter().find(|r| self.store_roles.get(*r) != next.store_roles.get(*r))
            else {
                return Ok(());
            };
            let origin = next.store_written.as_ref();
            let position = origin.and_then(|o| o.keys.get(role.name()).copied().or(o.section));
            return Err(ConfigError::new(
                ConfigErrorKind::Conflict,
                format!("store.{}", role.name()),
                format!(
                    "the store of the {} role cannot change while the service runs (it is {}, the new file \
                     says {}): the reload is refused and the running stores stay; restart to use another store",
                    role.name(),
                    self.store_of(role),
                    next.store_of(role)
                ),
            )
            .at(position)
            .in_file(next.file.clone()));
        }
        let key = match (&self.store, &next.store) {
            (StoreSettings::Sqlite { path: a, .. }, StoreSettings::Sqlite { path: b, .. }) if a != b => "path",
            (StoreSettings::Sqlite { .. }, StoreSettings::Sqlite { .. }) => "synchronous",
            (StoreSettings::Dynamodb { table: a, .. }, StoreSettings::Dynamodb { table: b, .. }) if a != b => "table",
            (StoreSettings::Dynamodb { .. }, StoreSettings::Dynamodb { .. }) => "endpoint",
            (StoreSettings::Postgres(a), StoreSettings::Postgres(b)) => {
                if a.url != b.url {
                    "url"
                } else if a.schema != b.schema {
                    "schema"
                } else if a.pool_size != b.pool_size {
                    "pool_size"
                } else if a.statement_timeout != b.statement_timeout {
                    "statement_timeout"
                } else if a.migrate != b.migrate {
                    "migrate"
                } else {
                    "ca_file"
                }
            }
            (StoreSettings::Redis(a), StoreSettings::Redis(b)) if a.url != b.url => "url",
            (StoreSettings::Redis(a), StoreSettings::Redis(b)) if a.cluster != b.cluster => "cluster",
            (StoreSettings::Redis(a), StoreSettings::Redis(b)) if a.accept_eviction != b.accept_eviction => {
                "accept_eviction"
            }
            (StoreSettings::Redis(a), StoreSettings::Redis(b)) if a.wait_replicas != b.wait_replicas => "wait_replicas",
            (StoreSettings::Redis(a), StoreSettings::Redis(b)) if a.wait_timeout != b.wait_timeout => "wait_timeout",
            (StoreSettings::Redis(_), StoreSettings::Redis(_)) => "prefix",
            _ => "kind",
        };
        let origin = next.store_written.as_ref();
        let position = origin.and_then(|o| o.keys.get(key).copied().or(o.section));
        Err(ConfigError::new(
            ConfigErrorKind::Conflict,
            format!("store.{key}"),
            format!(
                "the store cannot change while the service runs (it is {}, the new file says {}): \
                 the reload is refused and the running store stays; restart to use another store",
                self.store, next.store
            ),
        )
        .at(position)
        .in_file(next.file.clone()))
    }
}

impl Validator<'_, '_> {
    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let billing = self.billing(raw.billing.as_ref())?;
        // The selectors the file limits (`quotas."tokens{model=m-large}"`): each is counted.
        let selectors: std::collections::BTreeSet<String> = raw
            .plans
            .values()
            .flat_map(|p| std::iter::once(p).chain(p.versions.values()))
            .flat_map(|p| p.quotas.keys())
            .chain(raw.tenants.values().filter_map(|t| t.overrides.as_ref()).flat_map(|o| o.quotas.keys()))
            .filter(|k| k.contains('{'))
            .cloned()
            .collect();
        let meters = self.meters(&raw.meters, &selectors, &billing)?;
        let default_meter =
            self.meter_ref(&meters, "usage.default_meter", raw.usage.default_meter.as_deref().unwrap_or("requests"))?;
        self.counted_alone(&meters, "usage.default_meter", &default_meter)?;
        let mut plans = self.plans(&raw.plans, &meters, &billing)?;
        let (identify, on_unknown) = self.identify(&raw.identify, &plans)?;
        let clients = self.clients(&raw.identify)?;
        let limits = self.limits(&raw.limits)?;
        let usage = self.usage(&raw.usage)?;
        // A fleet scope that fails open serves, while its store is down, each node's share of
        // the limit: `fleet_size_hint` must say how many nodes share it (unset, each node
        // would serve the whole limit, N times it in all).
        for p in plans.values() {
            if let Some((key, why)) = fleet_without_hint(p, &usage, &limits) {
                return Err(self.invalid(&format!("plans.{}.{key}", p.table), why));
            }
        }
        // A node renews its places a third of `place_ttl` after the last renewal, in a pass a
        // second, each renewal waiting up to `usage.store_timeout` for its tenant's lock and its
        // call as long again, and it admits on them for two thirds of it: the renewal must be
        // able to land before the node stops admitting.
        let renewal = (usage.store_timeout * 2 + Duration::from_secs(1)) * 3;
        if plans.values().any(|p| p.concurrency_scope == super::Scope::Fleet) && limits.place_ttl < renewal {
            // Named where the file sets it: `place_ttl` when written, else the timeout.
            let key = match self.loc.find_exact("limits.place_ttl") {
                Some(_) => "limits.place_ttl",
                None => "usage.store_timeout",
            };
            return Err(self.invalid(
                key,
                format!(
                    "limits.place_ttl ({}s) is too short to renew a fleet concurrency's places with this \
                     usage.store_timeout: it must be at least 3 × (2 × usage.store_timeout + 1s) = {}s",
                    limits.place_ttl.as_secs(),
                    renewal.as_secs_f64().ceil()
                ),
            ));
        }
        for m in &meters {
            if let Some(w) = m.aggregation.window_secs() {
                if w % usage.window.as_secs() as i64 != 0 {
                    return Err(self.invalid(
                        &format!("meters.{}.aggregation", m.id),
                        format!(
                            "usage.window ({}s) must divide the meter's window ({w}s): \
                             each tollgate window must fall inside one window of the billing meter",
                            usage.window.as_secs()
                        ),
                    ));
                }
            }
        }
        let export = self.export(&raw.export)?;
        let stripe = raw.stripe.as_ref().map(|s| self.stripe(s, &plans)).transpose()?;
        self.recharge_prices(
            &mut plans,
            stripe.is_some(),
            stripe.as_ref().and_then(|s| s.credits.as_ref()).map(|c| &c.prices),
        )?;
        let metronome = raw.metronome.as_ref().map(|m| self.metronome(m)).transpose()?;
        // Metronome's timeout applies with its sink even without a `[metronome]` section.
        let metronome_timeout = metronome
            .as_ref()
            .map(|m| m.timeout)
            .or((export.sink == Some(SinkKind::Metronome)).then_some(Duration::from_secs(30)));
        if metronome.is_some() && export.sink != Some(SinkKind::Metronome) {
            return Err(self.invalid(
                "metronome",
                "a [metronome] section without export.sink = \"metronome\": usage would not go to Metronome; \
                 set the sink (one sink at a time) or remove the section",
            ));
        }
        for (section, timeout) in [("stripe", stripe.as_ref().map(|s| s.timeout)), ("metronome", metronome_timeout)] {
            // A claim must outlast the call it covers, or another node could send the same
            // event while the first call is still under way.
            if timeout.is_some_and(|t| export.claim < t * 2) {
                return Err(self.invalid(
                    "export.claim",
                    format!(
                        "must be at least twice {section}.timeout ({}s): a claim must outlast the call it covers",
                        timeout.unwrap_or_default().as_secs()
                    ),
                ));
            }
        }
        if export.sink == Some(SinkKind::Stripe) && stripe.is_none() {
            return Err(
                self.invalid("export.sink", "\"stripe\" needs a [stripe] section (its api_base, timeout and key file)")
            );
        }
        if export.sink == Some(SinkKind::Metronome) {
            // Metronome sums events: a pre-aggregated meter's running totals would be added up.
            if let Some(m) = meters.iter().find(|m| m.aggregation != MeterAggregation::Sum) {
                return Err(self.invalid(
                    &format!("meters.{}.aggregation", m.id),
                    "a pre-aggregated meter (\"hour\", \"day\") is a Stripe Billing Meters notion: with \
                     export.sink = \"metronome\" use \"sum\" and let the billable metric aggregate",
                ));
            }
        }
        let routes = self.routes(&raw.routes, &meters, &default_meter, &plans)?;
        let events = self.events(&raw.events, &meters)?;
        let alerts = self.alerts(&raw.alerts)?;
        let dashboard = self.dashboard(&raw.dashboard)?;
        self.hard_quotas_are_reachable(&plans, &routes, &default_meter, &events)?;
        let orgs = self.orgs(&raw.orgs, &plans)?;
        let tiers = self.tiers(&raw.tiers, &plans, &billing)?;
        let tenants = self.tenants(&raw.tenants, &plans, &orgs, &meters, &routes, &default_meter, &events, &billing)?;
        self.ladders_apart(&tiers, stripe.as_ref(), &orgs, &tenants)?;
        for t in &tenants {
            let Some(o) = &t.overrides else { continue };
            if let Some((key, why)) = fleet_without_hint(&plans[&t.plan].with_override(o), &usage, &limits) {
                return Err(self.invalid(&format!("tenants.{}.overrides.{key}", t.id), why));
            }
            if let Some((key, why)) = minute_past_skew(&o.quotas, &limits) {
                return Err(self.invalid(&format!("tenants.{}.overrides.{key}", t.id), why));
            }
        }
        for p in plans.values() {
            if let Some((key, why)) = minute_past_skew(&p.quotas, &limits) {
                return Err(self.invalid(&format!("plans.{}.{key}", p.table), why));
            }
        }
        if matches!(on_unknown, OnUnknown::Anonymous(_)) && tenants.iter().any(|t| t.id.as_str() == ANONYMOUS_TENANT) {
            return Err(self.loc.error(
                Kind::Conflict,
                &format!("tenants.{ANONYMOUS_TENANT}"),
                "`anonymous` is the tenant of unknown callers (identify.unknown = \"anonymous\"): name this tenant otherwise",
            ));
        }
        let (store, store_roles, store_written) = match &raw.store {
            None => (StoreSettings::default(), StoreRoles::default(), None),
            Some(raw) => {
                let (store, roles) = self.stores(raw)?;
                let mut origin = StoreOrigin { section: self.loc.find("store"), ..StoreOrigin::default() };
                for key in [
                    "kind",
                    "path",
                    "synchronous",
                    "table",
                    "endpoint",
                    "url",
                    "schema",
                    "pool_size",
                    "statement_timeout",
                    "migrate",
                    "ca_file",
                    "prefix",
                    "cluster",
                    "accept_eviction",
                    "wait_replicas",
                    "wait_timeout",
                ] {
                    if let Some(pos) = self.loc.find_exact(&format!("store.{key}")) {
                        origin.keys.insert(key, pos);
                    }
                }
                for role in ["quota", "usage", "directory", "idempotency", "rate", "places", "alerts"] {
                    if let Some(pos) = self.loc.find_exact(&format!("store.{role}")) {
                        origin.keys.insert(role, pos);
                    }
                }
                (store, roles, Some(origin))
            }
        };
        let dynamo = matches!(
            store_roles.get(StoreRole::Idempotency).unwrap_or(&store),
            StoreSettings::Dynamodb { .. } | StoreSettings::Redis(_)
        );
        // A window's share of the store's bytes (DynamoDB's and Redis's in 16 counters) must
        // hold one response of the longest stored body with its headers (allowed 8 KiB), or
        // every such response is refused.
        let parts = if dynamo { 32 } else { 2 };
        let longest = limits.idempotency_max_body.saturating_add(HEADERS_ALLOWANCE);
        if limits.idempotency_store_bytes / parts < longest {
            return Err(self.invalid(
                "limits.idempotency_store_bytes",
                format!(
                    "must be at least {} bytes: {parts} times limits.idempotency_max_body ({}) and 8 KiB of \
                     headers{}, so that each window's share holds one response of the longest stored body",
                    longest.saturating_mul(parts),
                    limits.idempotency_max_body,
                    if dynamo { " (a DynamoDB idempotency store splits a window's half in 16 counters)" } else { "" },
                ),
            ));
        }
        if dynamo && limits.idempotency_max_body > crate::base::DYNAMODB_MAX_RESPONSE_BYTES as u64 {
            return Err(self.invalid(
                "limits.idempotency_max_body",
                format!(
                    "at most {} bytes on a DynamoDB idempotency store (an item holds 400 KB, its attribute \
                     names and the response's headers included)",
                    crate::base::DYNAMODB_MAX_RESPONSE_BYTES
                ),
            ));
        }
        Ok(Config {
            identify,
            on_unknown,
            limits,
            usage,
            meters,
            default_meter,
            plans,
            routes,
            orgs,
            tiers,
            tenants,
            store,
            store_roles,
            store_written,
            export,
            stripe,
            metronome,
            events,
            alerts,
            billing,
            dashboard,
            clients,
            file: None,
        })
    }
}

impl PlanOverride {
    /// Reads overrides from their JSON form (`{"rate": "100/s", "burst": 50, "quotas":
    /// {"tokens": {"limit": 500, "period": "day"}}, "features": ["sso"]}`), checked against
    /// the configuration's meters as the file's `[tenants.X.overrides]` are.
    ///
    /// # Errors
    /// What is wrong, with the key path (no line: the text is not a file).
    pub fn from_json(json: &str, config: &Config) -> Result<Self, ConfigError> {
        parse_override(json, config)
    }
}

/// A tenant's overrides in their JSON form (the store's directory), checked as the file's are.
fn parse_override(json: &str, config: &Config) -> Result<PlanOverride, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(json);
    let raw: RawOverride = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { "overrides".to_owned() } else { format!("overrides.{path}") };
        ConfigError::new(Kind::InvalidValue, key, e.inner().to_string())
    })?;
    let loc = Located { text: "", root: None };
    Validator { loc: &loc }.plan_override("overrides", &raw, &config.meters, &config.billing)
}

/// A minute quota among `quotas` when the clocks of the fleet's nodes may differ by more than
/// a store keeps an ended period (`limits.clock_skew`, a tenth of `reservation_expiry`, past
/// `store::contract::ENDED_PERIODS_KEPT_SECS`): a node that
/// far ahead would make the store drop the minute the others are still in. Its key and why.
fn minute_past_skew(
    quotas: &std::collections::BTreeMap<crate::base::MeterId, super::QuotaSpec>,
    limits: &super::Limits,
) -> Option<(String, String)> {
    let kept = crate::base::ENDED_PERIODS_KEPT_SECS as u64;
    if limits.clock_skew() <= Duration::from_secs(kept) {
        return None;
    }
    let (meter, _) = quotas.iter().find(|(_, q)| q.period() == crate::base::Period::Minute)?;
    Some((
        format!("quotas.{}.period", super::dimensions::key_segment(meter.as_str())),
        format!(
            "a minute quota needs the fleet's clocks within {kept} s of each other, and \
             `limits.reservation_expiry` ({}) tolerates a tenth of it: set it to {} minutes or less \
             (with `limits.idle_timeout` {} minutes or less, as it is at least twice that)",
            humantime::format_duration(limits.reservation_expiry),
            kept * 10 / 60,
            kept * 10 / 120
        ),
    ))
}

/// Whether `plan` keeps a rate or concurrency for the fleet and fails open without
/// `limits.fleet_size_hint` in the file: while the store is down each node serves its share
/// of the limit, and without the hint it would serve the whole of it. The scope's key and why.
fn fleet_without_hint(
    plan: &super::plans::PlanSpec,
    usage: &super::UsageSettings,
    limits: &super::Limits,
) -> Option<(&'static str, String)> {
    if limits.fleet_size_hint_set {
        return None;
    }
    let policy = plan.on_store_error.or(usage.on_store_error_set.then_some(usage.on_store_error));
    if policy == Some(super::StoreErrorPolicy::FailClosed) {
        return None;
    }
    let (key, what) = match (plan.rate_scope, plan.concurrency_scope) {
        (super::Scope::Fleet, _) => ("rate_scope", "fleet rate"),
        (_, super::Scope::Fleet) => ("concurrency_scope", "fleet concurrency"),
        _ => return None,
    };
    Some((
        key,
        format!(
            "a {what} that fails open needs `limits.fleet_size_hint` (the nodes sharing it: while the store \
             is down each node serves its share of the limit, and without the hint it would serve the whole \
             of it); set it, or `on_store_error = \"fail-closed\"`"
        ),
    ))
}
