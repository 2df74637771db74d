//! Plans and routes compiled for the request path: indices instead of names, precomputed
//! header values.

use std::{collections::HashMap, fmt::Write as _, num::NonZeroU32, sync::Arc};

use governor::{
    middleware::{NoOpMiddleware, StateInformationMiddleware},
    nanos::Nanos,
    state::StateStore,
    InsufficientCapacity, NotUntil,
};

use crate::tenant::{ClientCells, ClientKeys};

use crate::{
    base::Period,
    clock::Clock,
    config::{
        Config, HeaderStyle, MeterId, PlanId, PlanSpec, QuotaMode, QuotaSpec, Rate, StatusSet, StoreErrorPolicy,
        TenantId,
    },
    metrics::Metrics,
    tenant::KeyHash,
    tenant::{GcraCell, TenantCells},
};

use crate::config::RoutePattern;

/// The meters of a configuration, by index.
#[derive(Debug)]
pub(crate) struct MeterTable {
    pub(crate) ids: Box<[MeterId]>,
    /// The features routes require, by index (a route's `feature` is its index + 1).
    pub(crate) features: Box<[Box<str>]>,
    /// By index, the meters a record of it counts in too, as bits: a series' total and the
    /// selectors it matches (0 for every other meter).
    pub(crate) rollups: Box<[u64]>,
    /// By index, a meter with dimensions' series.
    pub(crate) dims: Box<[Option<Box<SeriesIndex>>]>,
    /// The selectors (`tokens{model=m-large}`: counted from their series), as bits.
    pub(crate) selectors: u64,
    /// By index, the meter's name in rate-limit headers ([`MeterId::policy_name`]), made once.
    pub(crate) policy_names: Box<[Box<str>]>,
    /// The meters whose units are counted against their quotas but recorded as no usage of
    /// their own (a meter with dimensions' total and its selectors: its series are the usage,
    /// billed once), as bits. An open series (`tokens{model=*,…}`) is among them: its units
    /// are recorded under each value ([`OpenSeries`]).
    pub(crate) unrecorded: u64,
    /// By index, an open series: the series of a meter's open dimension's values not listed
    /// (`max_values`), limited and priced as one, recorded and billed per value.
    pub(crate) open: Box<[Option<Box<OpenSeries>>]>,
}

/// A series of an open dimension's values not listed (`tokens{model=*,kind=output}`).
#[derive(Debug)]
pub(crate) struct OpenSeries {
    /// The meter with dimensions it is a series of (its index).
    pub(crate) meter: u8,
    /// The open dimension and the most values a tenant may use in a month.
    pub(crate) dimension: Box<str>,
    pub(crate) cap: u32,
    /// Whether a value past the cap is refused (`on_unknown = "refuse"`), else counted under
    /// `"other"`.
    pub(crate) refuse: bool,
    /// The series' id around its open value: `tokens{model=` and `,kind=output}`.
    prefix: Box<str>,
    suffix: Box<str>,
}

impl OpenSeries {
    /// The id of the series at `value`: `tokens{model=m-new,kind=output}`.
    pub(crate) fn id(&self, value: &str) -> MeterId {
        MeterId::from(format!("{}{value}{}", self.prefix, self.suffix).as_str())
    }

    /// Whether `id` is the id of this series at some value.
    pub(crate) fn has(&self, id: &str) -> bool {
        id.strip_prefix(&*self.prefix)
            .and_then(|rest| rest.strip_suffix(&*self.suffix))
            .is_some_and(crate::base::is_dimension_value)
    }
}

/// A meter with dimensions' series, by offset ([`MeterDimensions::offset`]).
#[derive(Debug)]
pub(crate) struct SeriesIndex {
    pub(crate) dims: Arc<crate::config::MeterDimensions>,
    pub(crate) series: Box<[u8]>,
}

impl MeterTable {
    /// Whether `meter` is a meter with dimensions, one of its series or a selector.
    pub(crate) fn has_dimensions(&self, meter: usize) -> bool {
        self.dims.get(meter).is_some_and(Option::is_some)
            || self.rollups.get(meter).is_some_and(|r| *r != 0)
            || (self.selectors >> meter) & 1 != 0
    }

    /// Whether `meter`'s units are recorded as usage of its own (not a total or a selector).
    #[inline]
    pub(crate) fn recorded(&self, meter: usize) -> bool {
        (self.unrecorded >> meter) & 1 == 0
    }

    /// The table of `ids` (in their order) as `config` declares them.
    pub(crate) fn new(ids: Vec<MeterId>, features: Vec<Box<str>>, config: &Config) -> Self {
        let spec = |id: &MeterId| config.meters().iter().find(|m| m.id() == id);
        let index = |id: &MeterId| ids.iter().position(|m| m == id);
        let mut rollups = vec![0u64; ids.len()];
        let mut dims: Vec<Option<Box<SeriesIndex>>> = (0..ids.len()).map(|_| None).collect();
        let mut selectors = 0u64;
        let mut open: Vec<Option<Box<OpenSeries>>> = (0..ids.len()).map(|_| None).collect();
        for (i, id) in ids.iter().enumerate() {
            let Some(m) = spec(id) else { continue };
            if let (true, Some(total)) = (m.is_series(), m.series_of()) {
                let family = spec(total).and_then(|t| t.dimensions().map(|d| (index(total), d)));
                if let Some((Some(family), d)) = family {
                    if let Some((dimension, cap)) = d.open() {
                        let marker = format!("{dimension}={}", crate::config::OPEN_POSITION);
                        if let Some((prefix, suffix)) = id.as_str().split_once(&marker) {
                            open[i] = Some(Box::new(OpenSeries {
                                meter: family as u8,
                                dimension: dimension.into(),
                                cap,
                                refuse: d.on_unknown() == crate::config::OnUnknownValue::Refuse,
                                prefix: format!("{prefix}{dimension}=").into(),
                                suffix: suffix.into(),
                            }));
                        }
                    }
                }
            }
            if m.series_of().is_some() && !m.is_series() {
                selectors |= 1 << i;
            }
            if let Some(d) = m.dimensions() {
                let series = (0..d.series())
                    .map(|off| {
                        let sid =
                            crate::config::MeterId::from(crate::config::selector_id(id.as_str(), d.values_at(off)));
                        index(&sid).expect("validated: every series is declared") as u8
                    })
                    .collect();
                dims[i] = Some(Box::new(SeriesIndex { dims: Arc::new(d.clone()), series }));
            }
            if !m.is_series() {
                continue;
            }
            let total = m.series_of().expect("a series has its meter");
            let mut bits = index(total).map_or(0, |t| 1u64 << t);
            // Every selector of the same meter whose values this series has.
            for (j, other) in ids.iter().enumerate() {
                let Some(o) = spec(other) else { continue };
                if j != i
                    && o.series_of() == Some(total)
                    && !o.is_series()
                    && o.values().all(|p| m.values().any(|q| q == p))
                {
                    bits |= 1 << j;
                }
            }
            rollups[i] = bits;
        }
        let policy_names = ids.iter().map(|id| Box::from(&*id.policy_name())).collect();
        let unrecorded = dims
            .iter()
            .zip(&open)
            .enumerate()
            .filter(|(_, (d, o))| d.is_some() || o.is_some())
            .fold(selectors, |b, (i, _)| b | (1 << i));
        Self {
            ids: ids.into(),
            features: features.into(),
            rollups: rollups.into(),
            dims: dims.into(),
            selectors,
            unrecorded,
            policy_names,
            open: open.into(),
        }
    }

    /// The series of the meter `meter` with dimensions at `values` (in any order), or why none;
    /// with, for an open series, the value its units count under (the open dimension's, or
    /// `"other"`: see [`MeterDimensions::open_value`](crate::config::MeterDimensions)).
    pub(crate) fn series<'v, K: AsRef<str>, V: AsRef<str>>(
        &self,
        meter: usize,
        values: &'v [(K, V)],
    ) -> Result<(usize, Option<&'v str>), crate::config::DimensionError> {
        use crate::config::DimensionError;
        let Some(index) = self.dims.get(meter).and_then(|d| d.as_deref()) else {
            return Err(DimensionError::Invalid(format!("the meter `{}` has no dimensions", self.ids[meter])));
        };
        let d = &index.dims;
        for (k, (n, _)) in values.iter().enumerate() {
            let n = n.as_ref();
            if !d.names().any(|x| x == n) {
                return Err(DimensionError::UnknownDimension(n.to_owned()));
            }
            if values[..k].iter().any(|(m, _)| m.as_ref() == n) {
                return Err(DimensionError::Invalid(format!("the dimension `{n}` is given twice")));
            }
        }
        // The offset of the series (the first dimension varies slowest), without allocating.
        let mut offset = 0usize;
        let mut open = None;
        for (k, name) in d.names().enumerate() {
            let value = values.iter().find(|(n, _)| n.as_ref() == name).map(|(_, v)| v.as_ref());
            let at = d.position(k, value)?;
            if d.open_dimension() == Some(k) && at + 1 == d.values[k].len() {
                open = Some(crate::config::MeterDimensions::open_value(value));
            }
            offset = offset * d.values[k].len() + at;
        }
        Ok((usize::from(index.series[offset]), open))
    }

    /// `route` (indexed by `self`) for a plan whose meters are `to`: the same meters by name
    /// (a meter `to` lacks becomes its default meter, index 0), the policy of the meter alone.
    /// For a request routed under one configuration and served by a tenant state of another,
    /// around a reload.
    pub(crate) fn remap(&self, route: RouteCost, to: &MeterTable) -> RouteCost {
        let map = |m: usize| self.ids.get(m).and_then(|id| to.index(id.as_str()));
        let meter = map(route.meter).unwrap_or(0);
        let mut reports = 0u64;
        let mut bits = route.reports;
        while bits != 0 {
            let m = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(i) = map(m) {
                reports |= 1 << i;
            }
        }
        // A feature `to` does not know is one no plan of it includes.
        let feature = match route.feature {
            0 => 0,
            f => self
                .features
                .get(usize::from(f) - 1)
                .and_then(|name| to.features.iter().position(|n| n == name))
                .map_or(NO_SUCH_FEATURE, |i| i as u8 + 1),
        };
        RouteCost {
            client: route.client,
            ..RouteCost::new(meter, route.cost, reports, meter as u8, feature, route.hold)
        }
    }

    pub(crate) fn index(&self, name: &str) -> Option<usize> {
        self.ids.iter().position(|m| m.as_str() == name)
    }
}

#[derive(Debug)]
pub(crate) struct RatePolicy {
    pub(crate) rate: Rate,
    pub(crate) burst: NonZeroU32,
    pub(crate) limiter: PlanLimiter,
    /// The bucket described in whole numbers for `RateLimit-Policy`: with `T` the time one
    /// cell takes to come back, `w = max(1, ⌈burst·T⌉)` (an empty bucket fills in `w`) and
    /// `q = max(burst, ⌊w / T⌋)`, so that `r` (the cells left) never exceeds `q`.
    pub(crate) q: u64,
    pub(crate) w: u64,
    /// When the limiter started, on the engine clock's monotonic nanoseconds: the tenants'
    /// arrival times are measured from it.
    pub(crate) start: u64,
}

/// `RateLimit-Policy`'s `q` and `w` of a bucket (see [`RatePolicy::q`]).
fn policy_q_w(rate: Rate, burst: NonZeroU32) -> (u64, u64) {
    let t = rate.interval().as_nanos().max(1);
    let burst_nanos = u128::from(burst.get()) * t;
    let w = burst_nanos.div_ceil(1_000_000_000).max(1);
    let q = (w * 1_000_000_000 / t).max(u128::from(burst.get()));
    (q.min(u128::from(u64::MAX)) as u64, w.min(u128::from(u64::MAX)) as u64)
}

impl RatePolicy {
    fn new(rate: Rate, burst: NonZeroU32, limiter: PlanLimiter, start: u64) -> Self {
        let (q, w) = policy_q_w(rate, burst);
        Self { rate, burst, limiter, q, w, start }
    }

    /// Nanoseconds for `cells` cells to come back.
    pub(crate) fn nanos(&self, cells: u32) -> u64 {
        (self.rate.interval().as_nanos() as u64).saturating_mul(u64::from(cells))
    }
}

type Keyed<K, S, MW> = governor::RateLimiter<K, S, Clock, MW>;

/// A rate limiter: one governor limiter (GCRA parameters and clock) over a keyed state store.
/// It reports the remaining burst only when headers need it.
pub(crate) enum Limiter<K: std::hash::Hash, S: StateStore<Key = K>> {
    Plain(Keyed<K, S, NoOpMiddleware<Nanos>>),
    Informed(Keyed<K, S, StateInformationMiddleware>),
}

/// The plan's rate limiter: for every tenant of the plan, each tenant's cell living in its
/// own state.
pub(crate) type PlanLimiter = Limiter<GcraCell, TenantCells>;

/// The anonymous plan's rate limiter: per client address, in a bounded map.
pub(crate) type ClientLimiter = Limiter<u64, ClientCells>;

/// The anonymous tenant's rate, per client address instead of one bucket for all.
#[derive(Debug)]
pub(crate) struct ClientRate {
    pub(crate) limiter: ClientLimiter,
    pub(crate) cells: ClientCells,
}

/// A conforming request: the remaining burst, when asked for.
pub(crate) type Conforming = Option<u32>;

impl<K: std::hash::Hash + Eq + Clone, S: StateStore<Key = K>> Limiter<K, S> {
    fn new(quota: governor::Quota, store: S, clock: &Clock, informed: bool) -> Self {
        let limiter = governor::RateLimiter::new(quota, store, clock.clone());
        if informed {
            Self::Informed(limiter.with_middleware())
        } else {
            Self::Plain(limiter)
        }
    }

    /// Takes `n` cells of `state`'s bucket.
    #[inline]
    pub(crate) fn check(
        &self,
        state: &K,
        n: NonZeroU32,
    ) -> Result<Result<Conforming, NotUntil<Nanos>>, InsufficientCapacity> {
        // One cell (most routes) takes governor's simpler single-cell path.
        match self {
            Self::Plain(l) if n.get() == 1 => Ok(l.check_key(state).map(|()| None)),
            Self::Plain(l) => l.check_key_n(state, n).map(|r| r.map(|()| None)),
            Self::Informed(l) if n.get() == 1 => Ok(l.check_key(state).map(|s| Some(s.remaining_burst_capacity()))),
            Self::Informed(l) => l.check_key_n(state, n).map(|r| r.map(|s| Some(s.remaining_burst_capacity()))),
        }
    }
}

impl<K: std::hash::Hash, S: StateStore<Key = K>> std::fmt::Debug for Limiter<K, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Limiter::Plain",
            Self::Informed(_) => "Limiter::Informed",
        })
    }
}

/// The bit of a route's client key that marks a request whose cells were taken from its
/// tenant's fleet lease (a plan with `rate_scope = "fleet"`; the anonymous plan's keys, its
/// callers' addresses', never have it): the low 32 bits are the lease they came from (0: none,
/// a shadow refusal admitted without cells), where its rate charge gives them back.
pub(crate) const FLEET_TAKEN: u64 = 1 << 63;

/// The client key of a request whose cells came from the fleet lease `generation`.
#[inline]
pub(crate) fn fleet_key(generation: u32) -> u64 {
    FLEET_TAKEN | u64::from(generation)
}

/// Whether a client key marks cells of a fleet lease ([`FLEET_TAKEN`]).
#[inline]
pub(crate) fn is_fleet(client: u64) -> bool {
    client & FLEET_TAKEN != 0
}

/// A fleet rate (`rate_scope = "fleet"`): one bucket per tenant in the rate role's store. The
/// plan's `rate` is then the node's own bucket when the store fails and the rate fails open
/// (rate / N, burst / N, N = `limits.fleet_size_hint`).
#[derive(Debug)]
pub(crate) struct FleetRate {
    pub(crate) bucket: crate::tenant::FleetBucket,
    /// The rate as written, for messages.
    pub(crate) rate: Rate,
    /// What a store failure does: the plan's `on_store_error` if set (its own or `[usage]`'s),
    /// else fail-open (to the node's own bucket).
    pub(crate) on_store_error: StoreErrorPolicy,
    /// `RateLimit-Policy`'s `q` and `w` of the fleet's bucket (see [`RatePolicy`]).
    pub(crate) q: u64,
    pub(crate) w: u64,
}

/// A plan ready for the request path.
#[derive(Debug)]
pub(crate) struct CompiledPlan {
    pub(crate) id: PlanId,
    pub(crate) rate: Option<RatePolicy>,
    /// The fleet's rate (`rate_scope = "fleet"`), whose bucket the rate role's store keeps.
    pub(crate) fleet: Option<Box<FleetRate>>,
    /// (meter index, quota), in meter order.
    pub(crate) quotas: Box<[(usize, QuotaSpec)]>,
    /// For each meter, the index of its quota in `quotas`.
    pub(crate) quota_of: Box<[Option<u8>]>,
    /// The usage window, in seconds.
    pub(crate) window_secs: i64,
    /// The `RateLimit-Policy` value for each policy shape of the configuration (see
    /// [`Runtime::shapes`]; none: no policy applies).
    pub(crate) policy_header: Box<[Option<http::HeaderValue>]>,
    /// For each policy shape that lists a month quota: its values for each length of month,
    /// or the quotas it lists, to write it per response (see [`MonthPolicy`]).
    pub(crate) policy_months: Box<[Option<MonthPolicy>]>,
    /// For each policy shape, the meters whose hard quotas it lists besides the route's own
    /// (a bit per meter index): their `RateLimit` items are read live from the tenant.
    pub(crate) shape_reports: Box<[u64]>,
    /// What the plan does when the store does not answer: the plan's `on_store_error`, else
    /// `usage.on_store_error`, else fail-closed if the plan has a hard quota (each quota then
    /// follows its own mode: see [`quota_policy`](Self::quota_policy)).
    pub(crate) on_store_error: StoreErrorPolicy,
    /// Whether `on_store_error` was set in the file (the plan's or `[usage]`'s).
    pub(crate) on_store_error_set: bool,
    pub(crate) meters: Arc<MeterTable>,
    pub(crate) billable: StatusSet,
    /// Whether a request cut off once its service was called is billed (`usage.bill_cancelled`).
    pub(crate) bill_cancelled: bool,
    /// The gRPC status codes billed (`usage.billable_grpc`), a bit per code.
    pub(crate) billable_grpc: u32,
    pub(crate) header_style: HeaderStyle,
    /// The most requests of one tenant in flight at once on a node (`concurrency`); 0: no
    /// limit.
    pub(crate) concurrency: u32,
    /// Whether `concurrency` counts the fleet's requests (`concurrency_scope = "fleet"`), in
    /// places leased from the places role's store.
    pub(crate) concurrency_fleet: bool,
    /// How a request is refused when a prepaid balance is empty (`limits.balance_status`).
    pub(crate) balance_refusal: crate::base::RejectionKind,
    pub(crate) metrics: Arc<Metrics>,
    /// The features routes require that the plan includes (a bit per feature index).
    pub(crate) feature_bits: u64,
    /// Every feature of the plan (with the tenant's overrides), sorted.
    pub(crate) features: Arc<[Box<str>]>,
    /// Shadow mode: decisions are counted, nothing is refused.
    pub(crate) shadow: bool,
    /// The tenant's overrides this plan was compiled with (their JSON form), if any.
    pub(crate) overrides: Option<Box<str>>,
    /// The anonymous tenant's plan: its rate per client address.
    pub(crate) clients: Option<ClientRate>,
    /// The plan's spend cap: the index of the spend meter, whose quota it is (`spend = { … }`).
    pub(crate) spend: Option<usize>,
    /// With a spend cap, the price of each meter (by index): the plan's, else the meter's;
    /// empty without one (nothing is priced then).
    pub(crate) prices: Box<[Option<rust_decimal::Decimal>]>,
    /// The meters whose records cost money, as bits (by index): the priced ones, and each meter
    /// with dimensions or selector whose series are priced (a route reporting it checks the
    /// spend cap).
    pub(crate) priced: u64,
    /// No fleet rate, concurrency limit or spend cap: a request is decided by its rate and
    /// its route meter's quota alone (on a route that needs no feature, reports no meter and
    /// holds nothing, without an `Idempotency-Key`), in one step.
    pub(crate) straight: bool,
    /// The engine's clock, which the plan's tenants read (kept here, not in each tenant).
    pub(crate) clock: Clock,
    /// The organization whose limits the tenant's requests pass too (`[tenants.X] org`): a
    /// tenant in an organization is served a plan of its own, never the plan shared by its
    /// plan's other tenants, and never `straight`.
    pub(crate) org: Option<Arc<OrgLimits>>,
    /// The organization whose counters a state on this plan keeps (an organization's plan as
    /// [`OrgLimits::plan`] compiles it): units are taken and held there, never recorded as
    /// usage (its tenants' usage is theirs, billed once).
    pub(crate) counts_for: Option<crate::base::OrgId>,
}

/// An organization's limits as its tenants' requests pass them: its plan compiled, and the
/// state its counters are kept under (`counters`, the id [`OrgId::counters_id`] gives), which
/// the tenant table holds beside the tenants.
#[derive(Debug)]
pub(crate) struct OrgLimits {
    pub(crate) id: crate::base::OrgId,
    pub(crate) counters: TenantId,
    pub(crate) plan: Arc<CompiledPlan>,
    /// The meters its plan has a quota on, a bit per meter index.
    pub(crate) meters: u64,
}

impl CompiledPlan {
    /// The price of `meter` when the plan counts spend (a spend cap and a price).
    #[inline]
    pub(crate) fn price(&self, meter: usize) -> Option<rust_decimal::Decimal> {
        self.prices.get(meter).copied().flatten()
    }

    /// `RateLimit-Policy`'s `q` and `w` of the plan's rate: the fleet's bucket for a fleet
    /// rate (not the node's share), else the node's.
    #[inline]
    pub(crate) fn rate_q_w(&self) -> Option<(u64, u64)> {
        match &self.fleet {
            Some(f) => Some((f.q, f.w)),
            None => self.rate.as_ref().map(|r| (r.q, r.w)),
        }
    }

    /// What a quota call for `meter` does when the store does not answer: the policy set in
    /// the file, else the quota's mode (a hard quota fails closed, it is never passed; a soft
    /// one, or none, fails open).
    /// A prepaid balance always fails closed: no work is served on credit the store cannot
    /// check, whatever `on_store_error` says.
    pub(crate) fn quota_policy(&self, meter: usize) -> StoreErrorPolicy {
        let quota = self.quota_of.get(meter).copied().flatten().map(|q| &self.quotas[usize::from(q)].1);
        if quota.is_some_and(|q| q.period() == Period::Prepaid) {
            return StoreErrorPolicy::FailClosed;
        }
        if self.on_store_error_set {
            return self.on_store_error;
        }
        match self.quota_of.get(meter).copied().flatten() {
            Some(q) if self.quotas[usize::from(q)].1.mode() == QuotaMode::Hard => StoreErrorPolicy::FailClosed,
            _ => StoreErrorPolicy::FailOpen,
        }
    }
}

/// The `RateLimit-Policy` of a shape listing month quotas, whose window is the length of the
/// month in force.
#[derive(Debug)]
pub(crate) enum MonthPolicy {
    /// One month quota, of `meter`: the value for each length of month, 28 to 31 days.
    One { meter: usize, by_days: [http::HeaderValue; 4] },
    /// Several (their months may differ): the quotas listed, written per response.
    Many(Box<[usize]>),
}

/// Appends `"METER-PERIOD";q=LIMIT;w=W` to a `RateLimit-Policy` list, with the quota's unit
/// when the meter does not count requests: under `headers = "draft"`, `qu` only for a unit the
/// draft registers (`content-bytes`), else the vendor parameter `tollgate-unit="METER"`; under
/// `"draft-compat"`, `qu="METER"` as before.
/// A prepaid balance is not listed: its quota is each tenant's own and it has no window, so
/// only the `RateLimit` field reports it (`r`, without `t`).
pub(crate) fn policy_item(out: &mut String, meter: &str, quota: &QuotaSpec, w: u64, style: HeaderStyle) {
    use std::fmt::Write as _;
    if quota.period() == Period::Prepaid {
        return;
    }
    if !out.is_empty() {
        out.push_str(", ");
    }
    let name = crate::base::policy_name(meter);
    let _ = write!(out, "\"{name}-{}\";q={};w={w}", quota.period().name(), quota.in_header(quota.limit().get()));
    // A spend cap counts nano-units of the currency (its own unit, not the registry's).
    // A series' or a selector's unit is its meter's (`tokens`).
    let unit = quota.unit.as_deref().unwrap_or_else(|| meter.split('{').next().unwrap_or(meter));
    match meter {
        "requests" => {}
        "content-bytes" => out.push_str(";qu=\"content-bytes\""),
        // (A spend cap is new: its unit is a vendor parameter in every style.)
        _ if style == HeaderStyle::DraftCompat && quota.unit.is_none() => {
            let _ = write!(out, ";qu=\"{unit}\"");
        }
        _ => {
            let _ = write!(out, ";tollgate-unit=\"{unit}\"");
        }
    }
}

/// `value` (a `RateLimit-Policy`) without the spend cap's item: a tenant that set its own cap
/// has a limit of its own, left out as a balance's is.
pub(crate) fn without_spend(value: &str) -> String {
    let spend = |item: &str| item.starts_with("\"spend-day\";") || item.starts_with("\"spend-month\";");
    value.split(", ").filter(|item| !spend(item)).collect::<Vec<_>>().join(", ")
}

/// The feature of a route that the tenant state's configuration does not know.
pub(crate) const NO_SUCH_FEATURE: u8 = u8::MAX;

/// A `'static` copy of `s`: each distinct string is leaked once per process (policy header
/// values: a few per configuration, bounded by the configurations loaded).
fn intern(s: String) -> &'static str {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = seen.get(s.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    seen.insert(leaked);
    leaked
}

impl CompiledPlan {
    /// Whether the plan includes the route's feature (`RouteCost::feature`; 0: none needed).
    #[inline]
    pub(crate) fn allows(&self, feature: u8) -> bool {
        feature == 0 || (feature != NO_SUCH_FEATURE && self.feature_bits & (1u64 << (feature - 1)) != 0)
    }

    /// Whether the plan includes `name`.
    pub(crate) fn has_feature(&self, name: &str) -> bool {
        self.features.binary_search_by(|f| (**f).cmp(name)).is_ok()
    }

    /// The index of the usage window holding `now` (Unix seconds).
    #[inline]
    pub(crate) fn window_index(&self, now: i64) -> u32 {
        // 32-bit division (Unix seconds fit until 2106): shorter latency than 64-bit.
        (now.max(0) as u32) / (self.window_secs as u32)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl CompiledPlan {
    /// `interned`: the policy header values are leaked once per distinct value (the plans of
    /// the file: bounded); a tenant's overrides get values of their own, freed with the plan.
    fn compile(
        spec: &PlanSpec,
        meters: &Arc<MeterTable>,
        shapes: &[(usize, u64)],
        config: &Config,
        metrics: &Arc<Metrics>,
        clock: &Clock,
        overrides: Option<Box<str>>,
    ) -> Self {
        let informed = config.limits.headers != HeaderStyle::None;
        // Money: with a spend cap, each meter's price (the plan's, else the meter's own).
        let spend_index = spec.spend().and_then(|_| meters.index(crate::config::SPEND_METER));
        let prices: Box<[Option<rust_decimal::Decimal>]> = match spend_index {
            None => Box::new([]),
            Some(_) => meters
                .ids
                .iter()
                .map(|id| {
                    spec.prices().get(id).copied().or_else(|| config.meters().iter().find(|m| m.id() == id)?.price())
                })
                .collect(),
        };
        // A fleet rate: the shared bucket's parameters; the node's own bucket is its share
        // (rate / N, burst / N, never below the dearest route), used only while the store
        // fails and the rate fails open.
        let fleet = match (spec.rate, spec.rate_scope) {
            (Some(rate), crate::config::Scope::Fleet) => {
                let (q, w) = policy_q_w(rate, spec.burst);
                Some(Box::new(FleetRate {
                    bucket: crate::tenant::FleetBucket {
                        interval: u64::try_from(rate.interval().as_nanos()).unwrap_or(u64::MAX).max(1),
                        burst: spec.burst.get(),
                    },
                    rate,
                    on_store_error: match (spec.on_store_error, config.usage.on_store_error_set) {
                        (Some(p), _) => p,
                        (None, true) => config.usage.on_store_error,
                        (None, false) => StoreErrorPolicy::FailOpen,
                    },
                    q,
                    w,
                }))
            }
            _ => None,
        };
        let rate = spec.rate.map(|rate| {
            let (rate, burst) = match &fleet {
                None => (rate, spec.burst),
                Some(_) => {
                    let n = config.limits.fleet_size_hint.max(1);
                    let dearest = config.routes.iter().map(|r| r.cost.get()).max().unwrap_or(1);
                    let share = Rate::new(rate.count(), rate.per().saturating_mul(n)).unwrap_or(rate);
                    let burst = NonZeroU32::new((spec.burst.get() / n).max(dearest)).unwrap_or(NonZeroU32::MIN);
                    (share, burst)
                }
            };
            let quota = governor::Quota::with_period(rate.interval())
                .expect("validated: the interval of a rate is never zero")
                .allow_burst(burst);
            // governor's limiter reads its start from the clock as it is made: the reading
            // taken around it, within nanoseconds on the system's clock. A fake clock advanced
            // meanwhile by another task (a plan compiled as a tenant is attached, while a test
            // drives the clock) would put the tenants' arrival times a whole step off (a bucket
            // of one second's burst found spent): made again until both readings agree.
            let now = || -> u64 { governor::clock::Clock::now(clock).into() };
            let mut tries = 0;
            loop {
                let start = now();
                let limiter = PlanLimiter::new(quota, TenantCells, clock, informed);
                tries += 1;
                if now().saturating_sub(start) < 1_000_000 || tries >= 8 {
                    break RatePolicy::new(rate, burst, limiter, start);
                }
            }
        });
        // `RateLimit-Policy` names the fleet's bucket, not the node's share.
        let rate_item = fleet.as_ref().map(|f| (f.q, f.w)).or(rate.as_ref().map(|r| (r.q, r.w)));
        // (As `rate_q_w` reads it once the plan is built.)
        let mut quotas: Vec<(usize, QuotaSpec)> =
            spec.quotas.iter().filter_map(|(m, q)| meters.index(m.as_str()).map(|i| (i, q.clone()))).collect();
        quotas.sort_by_key(|(m, _)| *m);
        let quotas: Box<[(usize, QuotaSpec)]> = quotas.into();
        let quota_of =
            (0..meters.ids.len()).map(|m| quotas.iter().position(|(i, _)| *i == m).map(|q| q as u8)).collect();
        let priced = prices.iter().enumerate().filter(|(_, p)| p.is_some()).fold(0u64, |b, (i, _)| b | (1 << i));
        // A route that uses a priced meter (its own, or one it reports; a meter with dimensions
        // or a selector whose series are priced) reports the spend too: its cap is a policy of the route's
        // answers, and a spent cap refuses its next requests.
        let costly =
            (0..meters.ids.len()).filter(|&j| (priced >> j) & 1 != 0).fold(priced, |bits, j| bits | meters.rollups[j]);
        let shapes: Vec<(usize, u64)> = shapes
            .iter()
            .map(|&(m, reports)| match spend_index {
                Some(s) if m != s && ((costly >> m) & 1 != 0 || reports & costly != 0) => (m, reports | (1 << s)),
                _ => (m, reports),
            })
            .collect();
        let shape_reports = shapes
            .iter()
            .map(|&(m, reports)| {
                quotas
                    .iter()
                    .filter(|(i, q)| *i != m && reports & (1 << i) != 0 && q.mode() == QuotaMode::Hard)
                    .fold(0u64, |bits, (i, _)| bits | (1 << i))
            })
            .collect();
        // For each shape, the quotas its policy lists (indexes of `quotas`), in order.
        let listed: Vec<Box<[usize]>> = shapes
            .iter()
            .map(|&(m, reports)| {
                let own = quotas.iter().position(|(i, _)| *i == m);
                let reported = quotas
                    .iter()
                    .enumerate()
                    .filter(|(_, (i, q))| *i != m && reports & (1 << i) != 0 && q.mode() == QuotaMode::Hard)
                    .map(|(k, _)| k);
                own.into_iter().chain(reported).collect()
            })
            .collect();
        // A month's window is the current period's length: a policy listing one month quota is
        // built for each length a month can have; one listing several is written per response.
        let policy_months: Box<[Option<MonthPolicy>]> = listed
            .iter()
            .map(|list| {
                let months: Vec<usize> =
                    list.iter().copied().filter(|&k| matches!(quotas[k].1.period(), Period::Month { .. })).collect();
                match months[..] {
                    [] => None,
                    [month] => Some(MonthPolicy::One {
                        meter: quotas[month].0,
                        by_days: std::array::from_fn(|d| {
                            let mut s = String::new();
                            if let Some((q, w)) = rate_item {
                                let _ = write!(s, "\"rate\";q={q};w={w}");
                            }
                            for &k in list.iter() {
                                let (i, q) = &quotas[k];
                                let w = if k == month { (28 + d as u64) * 86_400 } else { q.period().nominal_secs() };
                                policy_item(&mut s, meters.ids[*i].as_str(), q, w, config.limits.headers);
                            }
                            match overrides {
                                None => http::HeaderValue::from_static(intern(s)),
                                Some(_) => http::HeaderValue::from_str(&s).expect("names and numbers only"),
                            }
                        }),
                    }),
                    _ => Some(MonthPolicy::Many(list.clone())),
                }
            })
            .collect();
        let policy_header = listed
            .iter()
            .map(|list| {
                let mut s = String::new();
                if let Some((q, w)) = rate_item {
                    let _ = write!(s, "\"rate\";q={q};w={w}");
                }
                for &k in list.iter() {
                    let (i, q) = &quotas[k];
                    policy_item(&mut s, meters.ids[*i].as_str(), q, q.period().nominal_secs(), config.limits.headers);
                }
                // Built from static bytes, so that every response clones it without touching a
                // shared count; an overridden plan's own values are not leaked.
                (!s.is_empty()).then(|| match overrides {
                    None => http::HeaderValue::from_static(intern(s)),
                    Some(_) => http::HeaderValue::from_str(&s).expect("names and numbers only"),
                })
            })
            .collect();
        let straight = fleet.is_none() && spec.concurrency.is_none() && spend_index.is_none();
        Self {
            id: spec.id.clone(),
            rate,
            fleet,
            quotas,
            quota_of,
            window_secs: config.usage.window.as_secs().max(1) as i64,
            policy_header,
            policy_months,
            shape_reports,
            on_store_error: spec
                .on_store_error
                .or(config.usage.on_store_error_set.then_some(config.usage.on_store_error))
                .unwrap_or(if spec.quotas.values().any(|q| q.mode() == QuotaMode::Hard) {
                    StoreErrorPolicy::FailClosed
                } else {
                    StoreErrorPolicy::FailOpen
                }),
            on_store_error_set: spec.on_store_error.is_some() || config.usage.on_store_error_set,
            meters: meters.clone(),
            billable: config.usage.billable.clone(),
            bill_cancelled: config.usage.bill_cancelled,
            billable_grpc: config.usage.billable_grpc,
            header_style: config.limits.headers,
            concurrency: spec.concurrency.map_or(0, std::num::NonZeroU32::get),
            concurrency_fleet: spec.concurrency.is_some() && spec.concurrency_scope == crate::config::Scope::Fleet,
            balance_refusal: if config.limits.balance_status == 429 {
                crate::base::RejectionKind::QuotaExceeded
            } else {
                crate::base::RejectionKind::CreditsExhausted
            },
            metrics: metrics.clone(),
            feature_bits: meters
                .features
                .iter()
                .enumerate()
                .filter(|(_, f)| spec.features.contains(&***f))
                .fold(0u64, |bits, (i, _)| bits | (1u64 << i)),
            features: spec.features.iter().map(|f| Box::from(f.as_str())).collect(),
            shadow: spec.shadow || config.limits.shadow,
            overrides,
            clients: None,
            straight,
            clock: clock.clone(),
            org: None,
            counts_for: None,
            spend: spend_index,
            prices,
            priced: costly,
        }
    }
}

#[derive(Debug)]
pub(crate) struct CompiledRoute {
    method: Option<http::Method>,
    pattern: RoutePattern,
    pub(crate) cost: RouteCost,
}

/// What a request on a route costs: its meter and units, the meters its handler reports (a
/// bit per meter index), and the shape of its `RateLimit-Policy`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteCost {
    pub(crate) meter: usize,
    pub(crate) cost: u32,
    pub(crate) reports: u64,
    pub(crate) shape: u8,
    /// The feature the route requires (its index in [`MeterTable::features`] + 1; 0: none).
    pub(crate) feature: u8,
    /// The key of the client's address, for the anonymous tenant's rate (0: none).
    pub(crate) client: u64,
    /// The route's hold (its index in [`Runtime::holds`] + 1; 0: none).
    pub(crate) hold: u8,
    /// Nothing beyond its meter's units: no reported meter, feature or hold. Worked out once
    /// per route (and again by [`MeterTable::remap`]), so that admission tests one flag.
    pub(crate) plain: bool,
}

impl RouteCost {
    /// A route's cost, its `plain` flag worked out from the rest.
    pub(crate) fn new(meter: usize, cost: u32, reports: u64, shape: u8, feature: u8, hold: u8) -> Self {
        RouteCost {
            meter,
            cost,
            reports,
            shape,
            feature,
            client: 0,
            hold,
            plain: reports == 0 && feature == 0 && hold == 0,
        }
    }
}

/// A tenant declared in the configuration.
#[derive(Debug, Clone)]
pub(crate) struct StaticTenant {
    pub(crate) id: TenantId,
    pub(crate) plan: PlanId,
    pub(crate) customer: Option<String>,
    pub(crate) metronome_customer: Option<String>,
    /// The tenant's overrides, in their JSON form.
    pub(crate) overrides: Option<String>,
    /// The organization it belongs to.
    pub(crate) org: Option<crate::base::OrgId>,
}

/// Everything the request path needs from one configuration.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) config: Config,
    /// The meters, by index: routes and plans of this configuration index them.
    pub(crate) meters: Arc<MeterTable>,
    pub(crate) plans: HashMap<PlanId, Arc<CompiledPlan>>,
    pub(crate) routes: Box<[CompiledRoute]>,
    /// The holds of the routes that hold ([`RouteCost::hold`]).
    pub(crate) holds: Box<[Arc<crate::config::RouteHold>]>,
    /// The headers their estimates and dimension values are read from, each once.
    pub(crate) hold_headers: Arc<[http::HeaderName]>,
    pub(crate) default_meter: usize,
    pub(crate) anonymous: Option<Arc<CompiledPlan>>,
    /// The tenants declared in the file, consulted before the store.
    pub(crate) static_keys: HashMap<KeyHash, TenantId>,
    pub(crate) static_tenants: HashMap<TenantId, StaticTenant>,
    /// The organizations declared in the file, by name.
    pub(crate) orgs: HashMap<crate::base::OrgId, Arc<OrgLimits>>,
    /// The `WWW-Authenticate` challenge of a 401.
    pub(crate) challenge: Arc<str>,
    idempotency_methods: Box<[http::Method]>,
    /// `idempotency_methods` as [`method_bit`]s, so that a request's method is tested once,
    /// not against each listed method.
    honoured_methods: u16,
    /// The policy shapes of the routes, to compile a tenant's overridden plan.
    shapes: Box<[(usize, u64)]>,
    /// How client addresses are keyed, when anonymous callers are limited per address.
    pub(crate) client_keys: Option<ClientKeys>,
    metrics: Arc<Metrics>,
    clock: Clock,
}

impl Runtime {
    pub(crate) fn compile(config: Config, metrics: &Arc<Metrics>, clock: &Clock) -> Self {
        // The default meter first: its cells sit on the line every request touches.
        let mut ids: Vec<MeterId> = config.meters.iter().map(|m| m.id.clone()).collect();
        if let Some(i) = ids.iter().position(|m| *m == config.default_meter) {
            ids[..=i].rotate_right(1);
        }
        let mut features: Vec<Box<str>> = Vec::new();
        for r in &config.routes {
            if let Some(f) = &r.feature {
                if !features.iter().any(|x| **x == **f) {
                    features.push(f.as_str().into());
                }
            }
        }
        let meters = Arc::new(MeterTable::new(ids, features, &config));
        let index = |m: &MeterId| meters.index(m.as_str()).expect("validated: routes name declared meters");
        // The policy shapes of the routes: (meter, meters reported); first each meter alone,
        // then one per other combination the routes use (at most 256 in all).
        let mut shapes: Vec<(usize, u64)> = (0..meters.ids.len()).map(|m| (m, 0)).collect();
        let mut holds: Vec<Arc<crate::config::RouteHold>> = Vec::new();
        let routes: Box<[CompiledRoute]> = config
            .routes
            .iter()
            .map(|r| {
                let meter = index(&r.meter);
                let reports = r.reports.iter().fold(0u64, |bits, m| bits | (1 << index(m)));
                let shape = match shapes.iter().position(|s| *s == (meter, reports)) {
                    Some(i) => i,
                    None if reports != 0 && shapes.len() < 256 => {
                        shapes.push((meter, reports));
                        shapes.len() - 1
                    }
                    None => meter,
                };
                let feature = r
                    .feature
                    .as_ref()
                    .and_then(|f| meters.features.iter().position(|x| **x == **f))
                    .map_or(0, |i| i as u8 + 1);
                let hold = match &r.hold {
                    None => 0,
                    Some(h) => {
                        holds.push(Arc::new(h.clone()));
                        u8::try_from(holds.len()).expect("validated: at most 255 routes hold")
                    }
                };
                CompiledRoute {
                    method: r.method.clone(),
                    pattern: r.pattern.clone(),
                    cost: RouteCost::new(meter, r.cost.get(), reports, shape as u8, feature, hold),
                }
            })
            .collect();
        let plans: HashMap<PlanId, Arc<CompiledPlan>> = config
            .plans
            .values()
            .map(|p| {
                let plan = CompiledPlan::compile(p, &meters, &shapes, &config, metrics, clock, None);
                (p.id.clone(), Arc::new(plan))
            })
            .collect();
        let orgs = config
            .orgs
            .values()
            .map(|o| {
                let spec = &config.plans[o.plan()];
                let mut plan = CompiledPlan::compile(spec, &meters, &shapes, &config, metrics, clock, None);
                plan.counts_for = Some(o.id().clone());
                let plan = Arc::new(plan);
                let meters = plan.quotas.iter().filter(|(m, _)| *m < 64).fold(0u64, |bits, (m, _)| bits | (1 << m));
                let limits = OrgLimits { id: o.id().clone(), counters: o.id().counters_id(), plan, meters };
                (o.id().clone(), Arc::new(limits))
            })
            .collect();
        let default_meter = index(&config.default_meter);
        // The anonymous tenant's plan: its own compilation, whose rate is kept per client
        // address (a bounded map) instead of in the tenant's one cell.
        let anonymous = match &config.on_unknown {
            crate::config::OnUnknown::Anonymous(p) => config.plans.get(p).map(|spec| {
                let mut plan = CompiledPlan::compile(spec, &meters, &shapes, &config, metrics, clock, None);
                plan.clients = spec.rate.map(|rate| {
                    let quota = governor::Quota::with_period(rate.interval())
                        .expect("validated: the interval of a rate is never zero")
                        .allow_burst(spec.burst);
                    let cells = ClientCells::new(config.limits.max_clients);
                    let informed = config.limits.headers != HeaderStyle::None;
                    ClientRate { limiter: ClientLimiter::new(quota, cells.clone(), clock, informed), cells }
                });
                Arc::new(plan)
            }),
            _ => None,
        };
        // Anonymous callers' buckets, and the lookups of API keys, go by client address.
        let client_keys = Some(ClientKeys::new(config.clients.ipv6_prefix));
        let mut static_keys = HashMap::new();
        let mut static_tenants = HashMap::new();
        for t in &config.tenants {
            for k in &t.key_hashes {
                static_keys.insert(*k, t.id.clone());
            }
            let record = StaticTenant {
                id: t.id.clone(),
                plan: t.plan.clone(),
                customer: t.stripe_customer.clone(),
                metronome_customer: t.metronome_customer.clone(),
                overrides: t.overrides.as_ref().map(|o| o.to_json()),
                org: t.org.clone(),
            };
            static_tenants.insert(t.id.clone(), record);
        }
        let challenge = match &config.identify {
            crate::config::Identify::ApiKey { header } => format!("ApiKey header=\"{header}\""),
            crate::config::Identify::Extension => "Bearer".to_owned(),
        };
        Self {
            meters: meters.clone(),
            plans,
            routes,
            hold_headers: {
                let mut names: Vec<http::HeaderName> = Vec::new();
                for h in &holds {
                    if let crate::config::HoldEstimate::Header { header, .. } = &h.estimate {
                        if !names.contains(header) {
                            names.push(header.clone());
                        }
                    }
                    // The headers its meter's dimension values are read from.
                    for (_, source) in &h.values {
                        if let crate::config::ValueSource::Header(header) = source {
                            if !names.contains(header) {
                                names.push(header.clone());
                            }
                        }
                    }
                }
                names.into()
            },
            holds: holds.into(),
            default_meter,
            anonymous,
            static_keys,
            static_tenants,
            orgs,
            challenge: challenge.into(),
            idempotency_methods: config.limits.idempotency_methods.clone().into(),
            honoured_methods: config.limits.idempotency_methods.iter().fold(0, |bits, m| bits | method_bit(m)),
            shapes: shapes.into(),
            client_keys,
            metrics: metrics.clone(),
            clock: clock.clone(),
            config,
        }
    }

    /// `plan` as a tenant is served it (`spec`, with the `overrides` served: the engine finds
    /// them by the one served-plan rule, `settings::plan::served`), compiled: the plan's own
    /// compiled form when no overrides are served.
    pub(crate) fn compile_served(
        &self,
        plan: &PlanId,
        spec: &crate::config::PlanSpec,
        overrides: Option<&str>,
        org: Option<&Arc<OrgLimits>>,
    ) -> Arc<CompiledPlan> {
        match (overrides, self.plans.get(plan), org) {
            (None, Some(base), None) => {
                debug_assert!(spec.id() == plan, "a plan served without overrides is the plan itself");
                base.clone()
            }
            (overrides, _, org) => {
                let mut compiled = CompiledPlan::compile(
                    spec,
                    &self.meters,
                    &self.shapes,
                    &self.config,
                    &self.metrics,
                    &self.clock,
                    overrides.map(Into::into),
                );
                if let Some(org) = org {
                    compiled.org = Some(org.clone());
                    compiled.straight = false;
                }
                Arc::new(compiled)
            }
        }
    }

    /// The organization of a tenant the file declares, if it names one.
    pub(crate) fn org_of(&self, tenant: &TenantId) -> Option<&Arc<OrgLimits>> {
        self.orgs.get(self.static_tenants.get(tenant)?.org.as_ref()?)
    }

    /// The client address of a request (else `None`, and nothing is read): the peer, or
    /// through trusted proxies the rightmost untrusted hop of `Forwarded` / `X-Forwarded-For`;
    /// with whether it identifies the client.
    #[inline]
    pub(crate) fn client_ip<'a, I>(
        &self,
        peer: Option<std::net::IpAddr>,
        header_values: impl FnOnce(&'static str) -> I,
    ) -> Option<crate::tenant::Client>
    where
        I: Iterator<Item = &'a [u8]>,
    {
        self.client_keys.as_ref()?;
        let clients = &self.config.clients;
        if clients.trusted_proxies.is_empty() {
            return peer.map(crate::tenant::Client::given);
        }
        let header = clients.forwarded_header;
        crate::tenant::client(peer, &clients.trusted_proxies, header, header_values(header.name()))
    }

    /// Whether an `Idempotency-Key` on a request with this method is honoured.
    #[inline]
    pub(crate) fn honours_idempotency(&self, method: &str) -> bool {
        self.idempotency_methods.iter().any(|m| m.as_str() == method)
    }

    /// [`honours_idempotency`](Self::honours_idempotency) for an [`http::Method`]: one of the
    /// nine methods the configuration accepts by one test of its bit, any other by looking it
    /// up in the list (which, as the configuration refuses other methods, holds none of them
    /// today: the look-up keeps the answer right if it ever does).
    #[inline]
    pub(crate) fn honours_idempotency_of(&self, method: &http::Method) -> bool {
        let bit = method_bit(method);
        self.honoured_methods & bit != 0 && (bit != OTHER_METHOD || self.idempotency_methods.contains(method))
    }

    /// The meter and cost of a request: the first matching route, else the default meter at 1.
    /// `HEAD` matches the `GET` rules too (routers serve it with the `GET` handler); `path` is
    /// normalized ([`normalize_path`](super::normalize_path)).
    #[inline]
    pub(crate) fn route(&self, method: &str, path: &str) -> RouteCost {
        let head = method == "HEAD";
        for r in self.routes.iter() {
            if r.method.as_ref().is_none_or(|m| m.as_str() == method || (head && m.as_str() == "GET"))
                && r.pattern.matches(path)
            {
                return r.cost;
            }
        }
        RouteCost::new(self.default_meter, 1, 0, self.default_meter as u8, 0, 0)
    }
}

/// The bit of a method of none of the nine names `limits.idempotency_methods` accepts.
const OTHER_METHOD: u16 = 1 << 15;

/// A bit for each of the nine methods `limits.idempotency_methods` accepts (`GET`, `POST`,
/// `PUT`, `DELETE`, `HEAD`, `OPTIONS`, `CONNECT`, `PATCH`, `TRACE`), [`OTHER_METHOD`] for any
/// other: a set of those methods is a `u16`.
#[inline]
fn method_bit(method: &http::Method) -> u16 {
    match *method {
        http::Method::GET => 1,
        http::Method::POST => 1 << 1,
        http::Method::PUT => 1 << 2,
        http::Method::DELETE => 1 << 3,
        http::Method::HEAD => 1 << 4,
        http::Method::OPTIONS => 1 << 5,
        http::Method::CONNECT => 1 << 6,
        http::Method::PATCH => 1 << 7,
        http::Method::TRACE => 1 << 8,
        _ => OTHER_METHOD,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Runtime::honours_idempotency_of`]'s test of a bit gives what comparing the method with
    /// each listed one gives: for the nine methods the configuration accepts and methods of
    /// other names (one spelt as a standard one in lower case, `QUERY`, short and long ones),
    /// against the default list, an empty one, one, all nine, and lists holding methods of
    /// other names (which the configuration refuses, so put in by hand, to test the look-up).
    #[test]
    fn a_method_is_honoured_by_its_bit_as_by_the_list() {
        use http::Method;
        let standard = [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
            Method::CONNECT,
            Method::PATCH,
            Method::TRACE,
        ];
        let others = ["get", "QUERY", "PURGE", "PROPFIND", "X-A-METHOD-LONGER-THAN-FIFTEEN-BYTES"]
            .map(|m| Method::from_bytes(m.as_bytes()).unwrap());
        let bits: Vec<u16> = standard.iter().map(method_bit).collect();
        for (i, bit) in bits.iter().enumerate() {
            assert_eq!(bit.count_ones(), 1, "{}", standard[i]);
            assert_ne!(*bit, OTHER_METHOD, "{}", standard[i]);
            assert!(!bits[..i].contains(bit), "{} shares a bit", standard[i]);
        }
        assert!(others.iter().all(|m| method_bit(m) == OTHER_METHOD));
        let lists = [
            None,
            Some("[]"),
            Some(r#"["get"]"#),
            Some(r#"["POST", "PATCH"]"#),
            Some(r#"["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "PATCH", "TRACE"]"#),
        ];
        assert!(crate::config::Config::from_toml_str("[limits]\nidempotency_methods = [\"PURGE\"]").is_err());
        let all_nine = lists[4];
        let clock = crate::clock::Clock::fake_at_unix(1_700_000_000).0;
        // Lists with methods of other names besides: `PURGE` and the long one.
        let extended = [None, Some(r#"["post"]"#)].map(|l| (l, true));
        for (list, extend) in lists.iter().map(|l| (*l, false)).chain(extended) {
            let limits = list.map_or(String::new(), |l| format!("[limits]\nidempotency_methods = {l}\n"));
            let mut config =
                crate::config::Config::from_toml_str(&format!("{limits}[plans.p]\nrate = \"10/s\"")).unwrap();
            if extend {
                config.limits.idempotency_methods.extend([others[2].clone(), others[4].clone()]);
            }
            let rt = Runtime::compile(config, &Arc::new(Metrics::register()), &clock);
            for m in standard.iter().chain(&others) {
                let by_list = rt.idempotency_methods.contains(m);
                assert_eq!(rt.honours_idempotency_of(m), by_list, "{m} against {list:?}, extended: {extend}");
                assert_eq!(rt.honours_idempotency_of(m), rt.honours_idempotency(m.as_str()), "{m} against {list:?}");
            }
            if extend {
                assert!(rt.honours_idempotency_of(&others[2]) && !rt.honours_idempotency_of(&others[3]));
            }
            if list == all_nine {
                // Every method the configuration accepts has a bit of its own: none is looked up.
                assert_eq!(rt.honoured_methods.count_ones(), 9);
                assert_eq!(rt.honoured_methods & OTHER_METHOD, 0);
            }
        }
    }

    fn table(meters: &[&str], features: &[&str]) -> MeterTable {
        MeterTable {
            ids: meters.iter().map(MeterId::new).collect(),
            features: features.iter().map(|f| Box::<str>::from(*f)).collect(),
            rollups: meters.iter().map(|_| 0).collect(),
            dims: meters.iter().map(|_| None).collect(),
            selectors: 0,
            unrecorded: 0,
            policy_names: meters.iter().map(|m| Box::<str>::from(*m)).collect(),
            open: meters.iter().map(|_| None).collect(),
        }
    }

    /// A route is plain (admission's one test of the common request) exactly when it reports
    /// no meter, needs no feature and holds nothing, and stays so across a reload's remap: a
    /// feature the new configuration does not know makes it a refusal, never a plain route.
    #[test]
    fn a_route_is_plain_only_with_nothing_beyond_its_units() {
        assert!(RouteCost::new(0, 1, 0, 0, 0, 0).plain);
        assert!(!RouteCost::new(0, 1, 0b10, 1, 0, 0).plain, "a reported meter");
        assert!(!RouteCost::new(0, 1, 0, 0, 1, 0).plain, "a feature");
        assert!(!RouteCost::new(0, 1, 0, 0, 0, 1).plain, "a hold");
        let before = table(&["requests", "tokens"], &["sso"]);
        let after = table(&["requests"], &[]);
        let featured = before.remap(RouteCost::new(0, 1, 0, 0, 1, 0), &after);
        assert_eq!(featured.feature, NO_SUCH_FEATURE);
        assert!(!featured.plain);
        // A reported meter the new configuration lacks is dropped: nothing is left to report.
        let reported = before.remap(RouteCost::new(0, 1, 0b10, 2, 0, 0), &after);
        assert!(reported.plain, "{reported:?}");
        let kept = before.remap(RouteCost::new(1, 3, 0b01, 2, 0, 0), &table(&["tokens", "requests"], &[]));
        assert_eq!((kept.meter, kept.reports, kept.cost), (0, 0b10, 3));
        assert!(!kept.plain);
    }
}
