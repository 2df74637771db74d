//! Usage as handlers see it: the [`TenantContext`] in the request extensions, and the holds
//! it takes.

use std::{borrow::Cow, fmt, sync::Arc};

use crate::engine::usage::{
    hold::{Hold, RecordError, RouteHeld},
    spend::{charge_units, cost_of, SpendTab},
    units::Units,
};
use crate::{
    config::{Overrun, PlanId, TenantId},
    response::Rejection,
    tenant::Tenant,
};

/// The tenant of an admitted request, in its extensions: who is calling, on which plan, and a
/// handle to record extra usage on other meters (such as tokens computed from the response).
///
/// ```no_run
/// use axum::Extension;
/// use tollgate::TenantContext;
///
/// async fn generate(Extension(ctx): Extension<TenantContext>) -> String {
///     let tokens = 1234; // computed by the handler
///     ctx.record("tokens", tokens).expect("the tokens meter is declared");
///     format!("{} on {}", ctx.tenant(), ctx.plan())
/// }
/// ```
#[derive(Clone)]
pub struct TenantContext {
    state: Tenant,
    charged: bool,
    /// The hold of the request's route (`[[routes]] hold`): records of its meter go through it.
    hold: Option<Arc<RouteHeld>>,
    /// The request's spend (a plan with a spend cap): records of priced meters made without a
    /// hold are charged through it, rounded once for the request.
    spend: Option<Arc<SpendTab>>,
    /// The state of its tenant's organization's counters (a tenant in an organization): the
    /// units it records of a meter the organization limits count there too.
    org: Option<Tenant>,
    /// The usage part: the holds this context takes, the leases they take from.
    units: Arc<Units>,
}

/// A plan feature as a type, for extractors that require one (`tollgate_axum::RequireFeature`,
/// `tollgate_actix::RequireFeature`). Declare one with [`feature!`](crate::feature):
///
/// ```
/// tollgate::feature!(pub Sso = "sso");
/// use tollgate::Feature;
/// assert_eq!(Sso::NAME, "sso");
/// ```
pub trait Feature {
    /// The feature's name, as plans list it.
    const NAME: &'static str;
}

/// Declares a type for a plan feature: `tollgate::feature!(pub InvoiceExport = "invoice_export");`.
#[macro_export]
macro_rules! feature {
    ($vis:vis $name:ident = $feature:literal) => {
        #[doc = concat!("The plan feature `", $feature, "`.")]
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;

        impl $crate::Feature for $name {
            const NAME: &'static str = $feature;
        }
    };
}

/// A tenant's quota on one meter as this node sees it ([`TenantContext::quota`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuotaStatus {
    /// The plan's limit for the period (a prepaid balance: its open grants as the store last
    /// said to this node; 0 before this node's first lease of it).
    pub limit: u64,
    /// The units left in the period, across the fleet as last known here (units leased by
    /// other nodes count as used). Past a soft limit, 0.
    pub remaining: u64,
    /// Seconds until the period resets (0 for a prepaid balance, which never resets).
    pub reset_secs: u64,
}

impl TenantContext {
    /// The context of a request of `state` (`charged`: not a replay), with its route's hold
    /// and its spend.
    pub(crate) fn new(
        state: Tenant,
        charged: bool,
        hold: Option<Arc<RouteHeld>>,
        spend: Option<Arc<SpendTab>>,
        org: Option<Tenant>,
        units: Arc<Units>,
    ) -> Self {
        Self { state, charged, hold, spend, org, units }
    }

    /// The tenant.
    #[must_use]
    pub fn tenant(&self) -> &TenantId {
        &self.state.id
    }

    /// The tenant's plan.
    #[must_use]
    pub fn plan(&self) -> &PlanId {
        &self.state.plan.id
    }

    /// The tenant's billing customer, if the directory knows it.
    #[must_use]
    pub fn customer(&self) -> Option<&str> {
        self.state.customer()
    }

    /// Whether the tenant's plan (with its overrides) includes `feature`.
    #[must_use]
    pub fn has_feature(&self, feature: &str) -> bool {
        self.state.plan.has_feature(feature)
    }

    /// The features of the tenant's plan (with its overrides), sorted.
    pub fn features(&self) -> impl Iterator<Item = &str> {
        self.state.plan.features.iter().map(|f| &**f)
    }

    /// `Ok` when the tenant's plan includes `feature`; else the 403 rejection the engine
    /// answers for a route with `feature = "…"` (problem+json naming the feature), for a
    /// handler or an extractor to answer. In shadow mode the refusal is counted
    /// (`tollgate_shadow_would_refuse_total`) and `Ok` returned.
    ///
    /// Answered through tollgate's responders (`tollgate_axum::RejectionResponse`,
    /// `tollgate_actix::RejectionResponse`, the `RequireFeature` extractors), the response
    /// carries the rejection in its extensions, and the tower layer and the actix-web
    /// middleware then give the request's units back instead of billing it. Its rate cells
    /// are spent: a route rule with `feature` refuses before anything is taken.
    ///
    /// # Errors
    /// The rejection to answer.
    pub fn require_feature(&self, feature: &str) -> Result<(), crate::response::Rejection> {
        if self.has_feature(feature) {
            return Ok(());
        }
        let mut r = crate::response::Rejection::new(
            crate::base::RejectionKind::FeatureNotInPlan,
            format!("this route needs the feature `{feature}`, which plan `{}` does not include", self.plan()),
        );
        r.inner.policy = Some(feature.to_owned());
        r.inner.tenant = Some(self.state.id.clone());
        if self.state.plan.shadow {
            self.state.plan.metrics.would_refuse(r.kind()).increment(1);
            tracing::debug!(tenant = %self.state.id, feature, "shadow mode: would refuse (feature not in plan)");
            return Ok(());
        }
        self.state.plan.metrics.rejected(r.kind()).increment(1);
        self.tally_refused(&r);
        Err(r)
    }

    /// A refusal the handler answers with, in the fleet's tallies (the request was counted
    /// admitted when tollgate let it through: its handler refused it since).
    fn tally_refused(&self, r: &Rejection) {
        let now = self.state.clock().unix_secs();
        self.units.pipeline().tallies().refused(Some(&self.state.id), r.kind(), now);
    }

    /// The answer to a record of `meter` refused through a hold ([`RecordError::Overrun`],
    /// [`RecordError::SpendCap`]: the hold and the limit do not cover the work, which must
    /// not be delivered): the rejection tollgate answers for such a limit (429 `Quota
    /// exceeded` with `Retry-After` at the period's end, 402 `Prepaid credits exhausted`, 402
    /// `Spend cap reached`), for the handler to answer instead of delivering. `None` for the
    /// other errors (a meter not declared, a quantity no meter counts: bugs of the caller).
    ///
    /// Answered through tollgate's responders (`tollgate_axum::RejectionResponse`,
    /// `tollgate_actix::RejectionResponse`, [`respond`](crate::response::respond)), the
    /// response carries the rejection in its extensions, and the tower layer and the
    /// actix-web middleware give the request's units back instead of billing it: a refusal by
    /// the handler is not billed.
    ///
    /// [`RecordError::Overrun`]: crate::RecordError::Overrun
    /// [`RecordError::SpendCap`]: crate::RecordError::SpendCap
    #[must_use]
    pub fn refusal(&self, meter: &str, e: &RecordError) -> Option<crate::response::Rejection> {
        let at = self.state.clock().unix_secs();
        let r = match e {
            RecordError::SpendCap(_) if self.state.plan.spend.is_some() => {
                crate::engine::usage::spend::cap_reached(&self.state, at)
            }
            RecordError::Dimension(_) => return Some(self.invalid_dimension(meter, e)),
            RecordError::Overrun(_) => {
                let index = self.state.plan.meters.index(meter)?;
                // A meter with dimensions: the part of it whose limit refused (the route's held
                // series with its total and selectors, else every part of the meter), spent
                // first, else the first with a hard quota, else the meter's own.
                let table = &self.state.plan.meters;
                let family = format!("{meter}{{");
                let held = self.hold.as_ref().map(|h| h.meter()).filter(|&h| (table.rollups[h] >> index) & 1 != 0);
                let parts: Vec<usize> = match held {
                    Some(h) => std::iter::once(h)
                        .chain((0..table.ids.len()).filter(|&j| (table.rollups[h] >> j) & 1 != 0))
                        .collect(),
                    None => (0..table.ids.len())
                        .filter(|&j| j == index || table.ids[j].as_str().starts_with(&family))
                        .collect(),
                };
                // Refused at the tenant's organization: its quota on a part cannot cover the
                // units beyond the hold, where the tenant's own quotas can.
                let beyond = match e {
                    RecordError::Overrun(n) => *n,
                    _ => 1,
                };
                let covers =
                    |c: Option<crate::tenant::QuotaRef<'_>>| c.is_none_or(|c| c.check_units(beyond, at).is_ok());
                let org_spent = self.org.as_ref().and_then(|org| {
                    let own = parts.iter().all(|&j| covers(self.state.quota(j).filter(|c| c.hard())));
                    own.then(|| parts.iter().copied().find(|&j| !covers(org.quota(j)))).flatten()
                });
                if let (Some(org), Some(j)) = (self.org.as_ref(), org_spent) {
                    let r = crate::engine::usage::hold::spent(org, j, at, true);
                    let r = crate::engine::usage::hold::for_member(r, &self.state, j);
                    self.state.plan.metrics.rejected(r.kind()).increment(1);
                    self.tally_refused(&r);
                    return Some(r);
                }
                let hard = |j: &usize| self.state.quota(*j).is_some_and(|c| c.hard());
                let index = parts
                    .iter()
                    .copied()
                    .filter(hard)
                    .find(|&j| {
                        self.state
                            .quota(j)
                            .is_some_and(|c| matches!(c.check_units(1, at), Err(crate::tenant::Take::Exhausted)))
                    })
                    .or_else(|| parts.iter().copied().find(hard))
                    .unwrap_or(index);
                self.state.quota(index)?;
                crate::engine::usage::hold::spent(&self.state, index, at, true)
            }
            _ => return None,
        };
        self.state.plan.metrics.rejected(r.kind()).increment(1);
        self.tally_refused(&r);
        Some(r)
    }

    /// The dimension values of the series the request's route holds (`[[routes]]
    /// hold_values`: read from the request's headers), in the meter's order; empty when the
    /// route holds none. They decide what the route's hold bills and limits: a handler that
    /// reads the model from elsewhere (a JSON body) checks it against them.
    #[must_use]
    pub fn held_values(&self) -> Vec<(String, String)> {
        let Some(h) = &self.hold else { return Vec::new() };
        let mut values = crate::config::series_values(&self.state.plan.meters.ids[h.meter()]);
        // An open series' value, in place of its open position.
        if let (Some(spec), Some(value)) = (self.state.plan.meters.open[h.meter()].as_deref(), h.value()) {
            for (n, v) in &mut values {
                if **n == *spec.dimension {
                    *v = value.to_string();
                }
            }
        }
        values
    }

    /// Whether the tenant's plan runs in shadow mode (limits counted, nothing refused).
    #[must_use]
    pub fn is_shadow(&self) -> bool {
        self.state.plan.shadow
    }

    /// The tenant's quota on `meter` as this node knows it now, usage recorded by this
    /// request included (the `RateLimit` header is computed at admission, before it), or
    /// `None` when the plan sets no quota on that meter or the meter is unknown.
    #[must_use]
    pub fn quota(&self, meter: &str) -> Option<QuotaStatus> {
        let cell = self.state.quota(self.state.plan.meters.index(meter)?)?;
        let now = self.state.clock().unix_secs();
        let limit = cell.limit();
        // Units used outside any lease (recorded before a lease came) count until the store is
        // told; they are charged to the period in force when it is.
        let unleased = cell.unleased();
        let (start, end) = cell.period();
        let (remaining, end) = if start <= now && now < end {
            // A debt of the lease held (units used beyond it) is this period's.
            let lease = cell.lease();
            (cell.estimate(lease).0.saturating_sub(lease.min(0).unsigned_abs()), end)
        } else {
            // No lease for this period yet (a debt left is the last period's).
            (limit, cell.window(now).1)
        };
        Some(QuotaStatus {
            limit,
            remaining: remaining.saturating_sub(unleased),
            // A balance never resets.
            reset_secs: if cell.prepaid() { 0 } else { (end - now).max(0) as u64 },
        })
    }

    /// Whether this request repeats an `Idempotency-Key` already charged.
    #[must_use]
    pub fn is_replay(&self) -> bool {
        !self.charged
    }

    /// The series a record of `meter` at `dims` counts in, with the meters it counts in
    /// beside it (bits): for a meter with dimensions, its series at those values with its
    /// total and selectors; for a series, itself with them; for another meter, itself. An open
    /// series comes with the value its units count under, admitted (past the tenant's
    /// `max_values`, `"other"` or a refusal).
    fn resolve<'a>(
        &self,
        meter: &str,
        dims: &'a Dimensions<'_>,
    ) -> Result<(usize, u64, Option<Cow<'a, str>>), RecordError> {
        use crate::config::DimensionError;
        let table = &self.state.plan.meters;
        let index = table.index(meter).ok_or_else(|| RecordError::UnknownMeter(meter.to_owned()))?;
        let held = self.hold.as_ref().map(|h| h.meter());
        let mut open: Option<Cow<'a, str>> = None;
        let index = if table.dims[index].is_some() {
            match held {
                // The route holds one of its series (`hold_values`): a record without values
                // is of that series (at its value, an open series').
                Some(h) if dims.is_empty() && (table.rollups[h] >> index) & 1 != 0 => {
                    open = self.hold.as_ref().and_then(|h| h.value()).map(|v| Cow::Owned(v.into()));
                    h
                }
                _ => {
                    let (series, value) = table.series(index, &dims.pairs).map_err(RecordError::Dimension)?;
                    open = value.map(Cow::Borrowed);
                    series
                }
            }
        } else if !dims.is_empty() {
            return Err(RecordError::Dimension(DimensionError::Invalid(format!(
                "`{meter}` is not a meter with dimensions: record its values on the meter itself"
            ))));
        } else {
            index
        };
        if (table.selectors >> index) & 1 != 0 {
            return Err(RecordError::Dimension(DimensionError::Invalid(format!(
                "`{meter}` counts what its series record: record a series (the meter with a value of each dimension)"
            ))));
        }
        let open = match open {
            // The open series itself, named by its id: no value to count under.
            None if table.open[index].is_some() => {
                return Err(RecordError::Dimension(DimensionError::Invalid(format!(
                    "`{}` is the series of the values not listed: record a value",
                    table.ids[index]
                ))))
            }
            None => None,
            // The route's hold's own value: checked when it was taken, recorded through it.
            Some(value)
                if held == Some(index) && self.hold.as_ref().and_then(|h| h.value()).as_deref() == Some(&*value) =>
            {
                Some(value)
            }
            Some(value) => {
                let now = self.state.clock().unix_secs();
                let checked = self.state.check_open(index, &value, now).map_err(RecordError::Dimension)?;
                Some(if checked == &*value { value } else { Cow::Borrowed(crate::config::OTHER_VALUE) })
            }
        };
        Ok((index, table.rollups[index], open))
    }

    /// Records `quantity` units of the meter with dimensions `meter` at the values `dims`
    /// (`Dimensions::new().with("model", "m-large").with("kind", "output")`): in its series,
    /// priced at the series' price, and in the meter's total and every selector it matches
    /// (`tokens{model=m-large}`), each limited by its own quota. Otherwise as
    /// [`record`](Self::record).
    ///
    /// ```no_run
    /// # fn f(ctx: tollgate::TenantContext) -> Result<(), tollgate::RecordError> {
    /// use tollgate::Dimensions;
    /// let model = Dimensions::new().with("model", "m-large");
    /// ctx.record_with("tokens", 812, &model.clone().with("kind", "input"))?;
    /// ctx.record_with("tokens", 240, &model.with("kind", "output"))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`record`](Self::record), and [`RecordError::Dimension`] when the values name no
    /// series (a value the dimension's list lacks, or a dimension missing, under `on_unknown =
    /// "refuse"`; a dimension the meter does not have): nothing recorded.
    pub fn record_with(&self, meter: &str, quantity: u64, dims: &Dimensions<'_>) -> Result<(), RecordError> {
        if !self.charged {
            return self.replayed(meter, quantity);
        }
        let (index, rollups, open) = self.resolve(meter, dims)?;
        self.record_index(index, rollups, open.as_deref(), quantity)
    }

    /// Records `quantity` units of `meter` for the tenant, in the current window. The units
    /// also count against the tenant's quota on that meter: they happened, so a hard quota
    /// never refuses this request, but once it is spent it refuses the next requests on the
    /// routes that declare the meter in `reports` (recording on other routes still bills).
    /// Does nothing for a replayed request.
    ///
    /// On a route that holds this meter (`[[routes]] hold`), the units come out of the
    /// route's hold first, as [`Hold::record`](crate::Hold::record) takes them: past it, the
    /// route's `overrun` decides.
    ///
    /// # Errors
    /// [`RecordError::UnknownMeter`] when `meter` is not declared, [`RecordError::TooLarge`]
    /// for a quantity past `i64::MAX`, [`RecordError::Overrun`] past a route's hold with
    /// `overrun = "refuse"` (nothing recorded).
    pub fn record(&self, meter: &str, quantity: u64) -> Result<(), RecordError> {
        if !self.charged {
            return self.replayed(meter, quantity);
        }
        let none = Dimensions::new();
        let (index, rollups, open) = self.resolve(meter, &none)?;
        self.record_index(index, rollups, open.as_deref(), quantity)
    }

    /// A replay's record: nothing, once the meter and the quantity are checked.
    fn replayed(&self, meter: &str, quantity: u64) -> Result<(), RecordError> {
        self.state.plan.meters.index(meter).ok_or_else(|| RecordError::UnknownMeter(meter.to_owned()))?;
        if i64::try_from(quantity).is_err() {
            return Err(RecordError::TooLarge(quantity));
        }
        Ok(())
    }

    /// Records `quantity` of the meter `index` (under `open`, an open series' value) and of the
    /// meters `rollups` beside it.
    fn record_index(
        &self,
        index: usize,
        mut rollups: u64,
        open: Option<&str>,
        quantity: u64,
    ) -> Result<(), RecordError> {
        if i64::try_from(quantity).is_err() {
            return Err(RecordError::TooLarge(quantity));
        }
        if !self.charged || quantity == 0 {
            return Ok(());
        }
        if rollups != 0 {
            // The route holds this series: its hold records its total and selectors too.
            if let Some(result) = self.hold.as_ref().and_then(|h| h.record(index, open, quantity)) {
                return result;
            }
            // The route's hold first (past it with `overrun = "refuse"`, nothing is recorded).
            let mut meters = rollups;
            while meters != 0 {
                let m = meters.trailing_zeros() as usize;
                meters &= meters - 1;
                if let Some(result) = self.hold.as_ref().and_then(|h| h.record(m, None, quantity)) {
                    result?;
                    rollups &= !(1 << m);
                    break;
                }
            }
            self.record_index(index, 0, open, quantity)?;
            while rollups != 0 {
                let m = rollups.trailing_zeros() as usize;
                rollups &= rollups - 1;
                self.record_index(m, 0, None, quantity)?;
            }
            return Ok(());
        }
        if let Some(result) = self.hold.as_ref().and_then(|h| h.record(index, open, quantity)) {
            return result;
        }
        let now = self.state.clock().unix_secs();
        self.state.record_series(index, open, now, quantity);
        if let Some(cell) = self.state.quota(index) {
            cell.force_take(quantity, now);
        }
        if let Some(cell) = self.org.as_ref().and_then(|org| org.quota(index)) {
            // Usage that happened counts at the organization too, past its limit if need be:
            // its next requests on routes reporting the meter are refused there.
            cell.force_take(quantity, now);
        }
        if self.state.plan.meters.recorded(index) || open.is_some() {
            self.state.plan.metrics.usage_units.increment(quantity);
        }
        // A priced meter feeds the spend: through the request's tab (rounded once for the
        // request), else rounded per call.
        if let Some(exact) = cost_of(&self.state, index, quantity) {
            let prefetcher = self.units.prefetcher();
            match &self.spend {
                Some(tab) => tab.add(&self.state, exact, now, prefetcher),
                None => charge_units(&self.state, index, quantity, now, prefetcher),
            }
        }
        Ok(())
    }
}

impl TenantContext {
    /// Holds `units` of `meter` for this request's work, before it runs: a hard quota's or a
    /// prepaid balance's units are taken now (from the node's lease, else from the store),
    /// recorded as the work reports them ([`Hold::record`]), and what is not recorded is given
    /// back when the hold settles or drops. Records beyond the hold are charged as debt
    /// ([`Overrun::Debt`]); [`hold_with`](Self::hold_with) picks [`Overrun::Refuse`].
    ///
    /// ```no_run
    /// # async fn generate(ctx: tollgate::TenantContext, max_tokens: u64) -> Result<String, tollgate::Rejection> {
    /// use tollgate::Overrun;
    /// let mut hold = ctx.hold_with("tokens", max_tokens, Overrun::Refuse).await?;
    /// let mut out = String::new();
    /// for chunk in ["Hello", ", ", "world"] {
    ///     // Each chunk is billed before it is sent; past the hold, more is asked for.
    ///     if hold.record(1).is_err() {
    ///         hold.extend(64).await?;
    ///         hold.record(1).expect("just extended");
    ///     }
    ///     out.push_str(chunk);
    /// }
    /// hold.settle(); // what was held and not used goes back
    /// # Ok(out) }
    /// ```
    ///
    /// # Errors
    /// The rejection to answer with (put it in the response as it is, so the front door gives
    /// the request's units back): 429 when the quota's period cannot cover `units` (402 for a
    /// balance; a hold past the limit is refused before anything is taken), 503 when the store
    /// does not answer and the quota fails closed (failing open, the hold holds nothing). In
    /// shadow mode the refusal is counted and the units taken past the limit (a hold past the
    /// limit takes nothing).
    pub async fn hold(&self, meter: &str, units: u64) -> Result<Hold, Rejection> {
        self.hold_with(meter, units, Overrun::Debt).await
    }

    /// [`hold`](Self::hold), with what a record beyond the hold does.
    ///
    /// # Errors
    /// As [`hold`](Self::hold).
    pub async fn hold_with(&self, meter: &str, units: u64, overrun: Overrun) -> Result<Hold, Rejection> {
        self.hold_in_with(meter, &Dimensions::new(), units, overrun).await
    }

    /// [`hold`](Self::hold) of the meter with dimensions `meter` at the values `dims`: its
    /// series' units and their cost at the series' price (a balance or a spend cap in money
    /// holds the model's price for the estimate), with its total's and the matching
    /// selectors' units beside them; each refuses as its own quota does (a model's tokens per
    /// minute). Records through the hold count in all of them. Records of other values
    /// (`ctx.record_with`, the input of a hold on the output) are charged beside it, and what
    /// the hold does not record goes back as it settles.
    ///
    /// ```no_run
    /// # async fn f(ctx: tollgate::TenantContext, max_tokens: u64) -> Result<(), tollgate::Rejection> {
    /// use tollgate::{Dimensions, Overrun};
    /// let model = Dimensions::new().with("model", "m-large");
    /// let mut hold = ctx.hold_in_with("tokens", &model.clone().with("kind", "output"), max_tokens, Overrun::Refuse).await?;
    /// // The prompt's tokens, charged at the input price beside the hold.
    /// ctx.record_with("tokens", 812, &model.with("kind", "input")).ok();
    /// hold.record(240).ok(); // the output the model wrote
    /// hold.settle(); // the rest of max_tokens goes back
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`hold`](Self::hold); 400 ([`RejectionKind::InvalidDimension`]) when the values
    /// name no series of the meter.
    ///
    /// [`RejectionKind::InvalidDimension`]: crate::response::RejectionKind::InvalidDimension
    pub async fn hold_in(&self, meter: &str, dims: &Dimensions<'_>, units: u64) -> Result<Hold, Rejection> {
        self.hold_in_with(meter, dims, units, Overrun::Debt).await
    }

    /// [`hold_in`](Self::hold_in), with what a record beyond the hold does.
    ///
    /// # Errors
    /// As [`hold_in`](Self::hold_in).
    pub async fn hold_in_with(
        &self,
        meter: &str,
        dims: &Dimensions<'_>,
        units: u64,
        overrun: Overrun,
    ) -> Result<Hold, Rejection> {
        let state = self.state.clone();
        let hold = match self.resolve(meter, dims) {
            Ok((index, 0, _)) => Hold::new(state, Ok(index), self.charged, overrun, None, self.units.clone()),
            Ok((index, rollups, open)) => Hold::dimensioned(
                state,
                index,
                open.as_deref(),
                rollups,
                self.charged,
                overrun,
                None,
                self.units.clone(),
            ),
            // Its records fail as a record of an unknown meter does.
            Err(RecordError::UnknownMeter(_)) => {
                Hold::new(state, Err(meter.into()), self.charged, overrun, None, self.units.clone())
            }
            Err(e) => return Err(self.invalid_dimension(meter, &e)),
        };
        let mut hold = hold.with_org(self.org.as_ref());
        if let Err(r) = hold.extend(units).await {
            self.tally_refused(&r);
            return Err(r);
        }
        Ok(hold)
    }

    /// The 400 of dimension values that name no series.
    fn invalid_dimension(&self, meter: &str, e: &RecordError) -> Rejection {
        let mut r = Rejection::new(crate::base::RejectionKind::InvalidDimension, format!("meter `{meter}`: {e}"));
        r.inner.policy = Some(meter.to_owned());
        r.inner.tenant = Some(self.state.id.clone());
        self.state.plan.metrics.rejected(r.kind()).increment(1);
        self.tally_refused(&r);
        r
    }
}

/// The values of a meter's dimensions a record or a hold names
/// ([`TenantContext::record_with`], [`TenantContext::hold_in`]), in any order:
///
/// ```
/// let d = tollgate::Dimensions::new().with("model", "m-large").with("kind", "output");
/// assert_eq!(d.get("kind"), Some("output"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dimensions<'a> {
    /// (dimension, value), borrowed where they can be (a model read from a request's body
    /// is not copied).
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Dimensions<'a> {
    /// No values (a meter with `on_unknown = "other"` counts them under `"other"`).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// With `value` for `dimension` (replacing a value given before).
    #[must_use]
    pub fn with(mut self, dimension: impl Into<Cow<'a, str>>, value: impl Into<Cow<'a, str>>) -> Self {
        let (d, v) = (dimension.into(), value.into());
        match self.pairs.iter_mut().find(|(n, _)| *n == d) {
            Some(p) => p.1 = v,
            None => {
                if self.pairs.capacity() == 0 {
                    self.pairs.reserve_exact(crate::config::MAX_DIMENSIONS);
                }
                self.pairs.push((d, v));
            }
        }
        self
    }

    /// The value given for `dimension`.
    #[must_use]
    pub fn get(&self, dimension: &str) -> Option<&str> {
        self.pairs.iter().find(|(n, _)| *n == dimension).map(|(_, v)| &**v)
    }

    /// Whether no value is given.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

impl fmt::Debug for TenantContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantContext")
            .field("tenant", &self.state.id)
            .field("plan", &self.state.plan.id)
            .field("replay", &!self.charged)
            .finish()
    }
}
