//! What a tenant has used, for dashboards and "you have used X" pages: per meter with a quota,
//! used and remaining in the current period; and usage over a date range. Read from the
//! store, with this node's usage not flushed yet included.

use std::{collections::BTreeMap, sync::Arc};

use crate::engine::{usage::events::EventError, usage::views::History, Tollgate};
use crate::settings::recharge::RechargeView;
use crate::{
    config::{MeterId, Period, PlanId, QuotaMode, TenantId},
    store::StoreError,
    tenant::Tenant,
};

/// A tenant's tier on its ladder (`[tiers.NAME]`, docs/tiers.md): [`UsageReport::tier`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierView {
    /// The ladder.
    pub ladder: String,
    /// What the tenant has paid, net of refunds and disputes, in the smallest unit of
    /// [`currency`](Self::currency).
    pub paid: u64,
    /// The billing currency (`[billing] currency`).
    pub currency: String,
    /// When the earliest payment that still counts was paid (Unix seconds), if any.
    pub since: Option<i64>,
    /// What unlocks the next plan: `None` at the top, or while pinned.
    pub next: Option<NextTier>,
    /// Whether an operator pinned its tier (`tollgate tenants set-tier`).
    pub pinned: bool,
}

impl TierView {
    /// The tier of a tenant on `plan` of `ladder`, its payments as `answer` read them at `now`.
    pub(crate) fn of(
        ladder: &crate::config::TierSpec,
        plan: &PlanId,
        answer: &crate::store::PaymentAnswer,
        config: &crate::Config,
        now: i64,
    ) -> Self {
        let pinned = answer.pinned.is_some();
        let next = ladder
            .next(plan, answer.standing, now)
            .filter(|_| !pinned)
            .map(|(plan, paid_left, wait)| NextTier { plan: plan.clone(), paid_left, wait });
        Self {
            ladder: ladder.name().to_owned(),
            paid: answer.standing.paid,
            currency: config.billing().currency.clone().unwrap_or_default(),
            since: answer.standing.first_at,
            next,
            pinned,
        }
    }

    /// One line of it, for a person: `api: paid 5.00 usd since 2026-03-14T12:01:00Z; next
    /// tier2: 45.00 usd to pay, 6days 23h 59m 59s to wait` (`; pinned`, `; the top`).
    #[must_use]
    pub fn line(&self) -> String {
        let money = |minor: u64| format!("{} {}", crate::base::money_text(minor, &self.currency), self.currency);
        let mut line = format!("{}: paid {}", self.ladder, money(self.paid));
        if let Some(since) = self.since {
            // Any time Stripe's payload could carry: out of chrono's range, the number.
            let at = chrono::DateTime::from_timestamp(since, 0)
                .map_or_else(|| since.to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
            line.push_str(&format!(" since {at}"));
        }
        match (&self.next, self.pinned) {
            (_, true) => line.push_str("; pinned"),
            (None, false) => line.push_str("; the top"),
            (Some(n), false) => {
                line.push_str(&format!("; next {}: {} to pay", n.plan, money(n.paid_left)));
                if let Some(wait) = n.wait.filter(|w| !w.is_zero()) {
                    line.push_str(&format!(", {} to wait", humantime::format_duration(wait)));
                }
            }
        }
        line
    }
}

/// What unlocks the next plan of a tenant's ladder ([`TierView::next`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NextTier {
    /// The plan.
    pub plan: PlanId,
    /// The money still to pay, in the currency's smallest unit.
    pub paid_left: u64,
    /// The time still to wait: `None` before any payment (the wait starts with the first).
    pub wait: Option<std::time::Duration>,
}

/// A tenant's usage: its quotas in their current period, and its usage per window over the
/// range asked. See [`Tollgate::usage_report`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// The tenant.
    pub tenant: TenantId,
    /// Its plan.
    pub plan: PlanId,
    /// Each quota of its plan (with its overrides), in its current period.
    pub quotas: Vec<QuotaUsage>,
    /// Its usage per meter and window over the range asked, in (meter, window) order.
    pub usage: Vec<WindowUsage>,
    /// On a plan with a spend cap, its currency: the quota of the meter `spend` (among
    /// [`quotas`](Self::quotas)) counts nano-units of it (`tollgate::money::amount_of` gives
    /// the amount), and its limit is the tenant's own cap when it set one.
    pub currency: Option<String>,
    /// Its auto-recharges, one per prepaid meter its plan recharges (the plan of the tenant's
    /// state on this node, revalidated within `limits.directory_ttl`; docs/credits.md,
    /// "Recharge"): its settings within the plan's bounds, whether it is on (and why not:
    /// [`RechargeView::off_reason`]), the recharge open, failures, and this calendar month's
    /// recharges and spending.
    pub recharges: Vec<RechargeView>,
    /// On a plan of a ladder (`[tiers.NAME]`), its tier: what it has paid and what unlocks the
    /// next plan (docs/tiers.md).
    pub tier: Option<TierView>,
    /// Its subscription is past due and it keeps its plan until the grace ends (`[stripe]
    /// past_due_grace`, docs/stripe.md): when, and the plan it moves to then.
    pub past_due: Option<crate::store::PastDue>,
    /// The tenant's own spend cap as the store holds it.
    pub(crate) own_cap: Option<crate::store::SpendCap>,
    /// Its credit grants, open and closed (the closed kept 35 days, those closed used up 180), on
    /// every meter.
    pub(crate) grants: Vec<crate::store::CreditGrant>,
}

/// A quota in its current period.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuotaUsage {
    /// The meter.
    pub meter: MeterId,
    /// The quota's period.
    pub period: Period,
    /// The current period, `[start, end)` in Unix seconds (a prepaid balance: the bounds of its
    /// one counter, `Period::Prepaid.bounds`, which never ends in practice).
    pub start: i64,
    /// Its end.
    pub end: i64,
    /// The limit. For a prepaid balance, the units of its open grants.
    pub limit: u64,
    /// Hard or soft.
    pub mode: QuotaMode,
    /// Units used in the period: what the fleet has flushed to the store (other nodes' usage
    /// reaches it within `usage.flush_interval`) and what this node has not flushed yet. For a
    /// prepaid balance, the units taken from it by the whole fleet as the quota store holds
    /// them: spent, or leased by another node and not used yet (at most a lease per node).
    pub used: u64,
    /// Units this node holds for open holds of the tenant
    /// ([`TenantContext::hold`](crate::TenantContext::hold)): taken from the limit, not used
    /// yet (not in `used`). Other nodes' holds are in `used` for a balance (as their leases
    /// are), and not counted for a calendar quota.
    pub held: u64,
    /// `limit − used − held`, 0 past the limit.
    pub remaining: u64,
}

/// Usage of one meter in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WindowUsage {
    /// The meter.
    pub meter: MeterId,
    /// The window's start, in Unix seconds (for a meter aggregated per hour or day, that
    /// hour or day).
    pub window_start: i64,
    /// Units used.
    pub quantity: u64,
}

/// Why a usage report could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// No tenant has this id.
    #[error("no tenant `{0}`")]
    UnknownTenant(TenantId),
    /// The store did not answer.
    #[error("the store did not answer: {0}")]
    Store(#[from] StoreError),
}

impl Tollgate {
    /// A tenant's usage, for its dashboard: each quota of its plan (with its overrides) in
    /// its current period — used and remaining — and its usage per meter and window over
    /// `[from, to)` (Unix seconds). Read from the store, with the usage this node has not
    /// flushed yet included (not that of other nodes, which reaches the store within
    /// `usage.flush_interval`). Usage of a batch on its way to the store, or whose store answer
    /// was lost and waits for its retry, is left out until it lands (it may already be in the
    /// store): never counted twice. A report never waits for a flush, nor holds one up.
    ///
    /// # Errors
    /// The tenant is unknown, or the store did not answer.
    pub async fn usage_report(&self, tenant: &TenantId, from: i64, to: i64) -> Result<UsageReport, ReportError> {
        let state = self.known_tenant(tenant).await.map_err(|e| match e {
            EventError::UnknownTenant(t) => ReportError::UnknownTenant(t),
            EventError::Store(e) => ReportError::Store(e),
            other => ReportError::Store(StoreError::Backend(other.to_string().into())),
        })?;
        Ok(self.report_of(&state, from, to, None).await?)
    }

    /// The report [`usage_report`](Self::usage_report) makes, of a tenant this node holds now
    /// (`None` when it holds none: the dashboard never makes a tenant resident, which could
    /// evict the tenants it serves), its calls made as [`reading`](crate::store::limited::reading)
    /// says.
    #[cfg(feature = "dashboard")]
    pub(crate) async fn resident_report(&self, id: &TenantId, now: i64) -> Option<Result<UsageReport, StoreError>> {
        let state = self.gate().table().state(id)?;
        Some(self.report_of(&state, now, now, None).await)
    }

    /// [`usage_report`](Self::usage_report) of a tenant found: its store calls are at most
    /// one read of its spend cap's counters, one or two of its usage (one when the range
    /// covers its quotas' periods; as many again when this node committed usage meanwhile),
    /// one of its credit grants (with a prepaid balance), one of its payments (on a ladder's
    /// plan, for its tier), and per recharged meter one of its
    /// counters, made as [`reading`](crate::store::limited::reading) says.
    /// With `history`, the tenant's windows it holds are taken from it, not read again.
    pub(crate) async fn report_of(
        &self,
        state: &Tenant,
        from: i64,
        to: i64,
        history: Option<&History>,
    ) -> Result<UsageReport, StoreError> {
        crate::store::limited::reading(self.report_in(state, from, to, history)).await
    }

    /// [`report_of`](Self::report_of), its calls made as [`reading`](crate::store::limited::reading)
    /// says.
    async fn report_in(
        &self,
        state: &Tenant,
        from: i64,
        to: i64,
        history: Option<&History>,
    ) -> Result<UsageReport, StoreError> {
        let rt = self.shared().runtime().load_full();
        let tenant = &state.id;
        let now = self.shared().clock().unix_secs();
        // Each calendar quota's counters as the store holds them (what the fleet took of its
        // period: the `remaining` of the same read as `used`), one call per meter.
        let mut counters: BTreeMap<MeterId, Vec<crate::store::QuotaCounter>> = BTreeMap::new();
        for cell in state.quotas().filter(|c| !c.prepaid()) {
            if !counters.contains_key(cell.meter_id()) {
                let read = self.shared().stores().request().quota.counters(tenant, cell.meter_id()).await?;
                counters.insert(cell.meter_id().clone(), read);
            }
        }
        // A spend cap: the tenant's own, as the store holds it (this node may not have asked
        // since it was set; without counters, as this node last read it).
        let own_cap = match state.plan.spend.and_then(|s| state.quota(s)) {
            Some(cell) => match counters.get(cell.meter_id()).filter(|c| !c.is_empty()) {
                None => cell.tenant_cap(),
                Some(read) => read.iter().find_map(|c| c.cap),
            },
            None => None,
        };
        let periods: Vec<(MeterId, Period, i64, i64, u64, QuotaMode)> = state
            .quotas()
            .map(|c| {
                let (start, end) = c.spec.period().bounds(now);
                // The limit in force as the dashboard reads it: a spend cap's, the tenant's own
                // within the plan's as the store holds it (not this node's view); a balance's,
                // this node's view of its grants until the balance is read below.
                let granted = c.prepaid().then(|| c.limit());
                let (limit, mode) = crate::settings::caps::limit_in_force(c.spec, granted, own_cap);
                (c.meter_id().clone(), c.spec.period(), start, end, limit, mode)
            })
            .collect();
        let coarse: Vec<(MeterId, i64)> =
            rt.config.meters.iter().filter_map(|m| m.aggregation.window_secs().map(|w| (m.id.clone(), w))).collect();
        let align = |meter: &MeterId, w: i64| match coarse.iter().find(|(m, _)| m == meter) {
            Some((_, c)) => w - w.rem_euclid(*c),
            None => w,
        };
        let read = |lo: i64, hi: i64| async move {
            let mut out: BTreeMap<(MeterId, i64), u64> = BTreeMap::new();
            // The closed windows `history` holds are taken from it; the rest is read.
            let mut lo = lo;
            if let Some(h) = history.filter(|h| h.lo <= lo && lo < h.split) {
                // Per UTC day: every `lo` is a midnight (a period's start), as is the split.
                let closed = hi.min(h.split);
                out.extend(h.days.iter().filter(|((_, d), _)| (lo..closed).contains(d)).map(|(k, q)| (k.clone(), *q)));
                lo = h.split;
            }
            if lo < hi {
                for a in self.shared().stores().request().usage.usage_range(tenant, lo, hi).await? {
                    *out.entry((a.key.meter.clone(), a.key.window_start)).or_default() += a.quantity;
                }
            }
            Ok::<_, StoreError>(out)
        };
        // A prepaid balance's periods hold no usage windows: its period is the grants.
        let period_lo = periods.iter().filter(|p| p.1 != Period::Prepaid).map(|p| p.2).min().unwrap_or(0);
        let period_hi = periods.iter().filter(|p| p.1 != Period::Prepaid).map(|p| p.3).max().unwrap_or(0);
        let reads = || async move {
            let in_range = read(from, to).await?;
            let in_periods = match period_lo >= from && period_hi <= to {
                // The range read holds every window of the periods.
                true => in_range.clone(),
                false => read(period_lo, period_hi).await?,
            };
            Ok::<_, StoreError>((in_range, in_periods))
        };
        // The store read, then this node's usage not in it (the queue of the pipeline and the
        // tenant's counters, read at one instant, after it: none of it can be in the read).
        // If a batch of this node was committed between the two, the store is read again (the
        // read may have missed it); a flush is never waited for, nor held up.
        let pipeline = self.units().pipeline();
        // The tenant's state and any retired ones (a plan change), each once: found before
        // the queue is read (a drain takes its lock inside the table's), their usage peeked
        // with it.
        let states_now = || {
            let mut states: Vec<Tenant> = self.gate().table().state(tenant).into_iter().collect();
            for s in self.gate().table().retired().iter() {
                if s.id == *tenant && !states.iter().any(|t| Tenant::ptr_eq(t, s)) {
                    states.push(s.clone());
                }
            }
            states
        };
        let peek = |states: &[Tenant]| {
            let mut peeked: BTreeMap<(MeterId, i64), u64> = BTreeMap::new();
            for s in states {
                s.peek_usage(|m, window, q| {
                    let meter = s.plan.meters.ids[m].clone();
                    let window = align(&meter, window);
                    *peeked.entry((meter, window)).or_default() += q;
                });
                // Open values' usage, under each value's series.
                s.peek_open(|m, value, window, q| {
                    let Some(open) = s.plan.meters.open[m].as_deref() else { return };
                    *peeked.entry((open.id(value), window)).or_default() += q;
                });
            }
            peeked
        };
        let mut commits = pipeline.commits();
        let mut attempt = 0;
        let ((in_range, in_periods), local, states) = loop {
            attempt += 1;
            let read = reads().await?;
            let states = states_now();
            let (queued, mut local, now_commits) = pipeline.unstored_of(tenant, || peek(&states));
            if now_commits == commits || attempt == 2 {
                for ((meter, window), q) in queued {
                    *local.entry((meter, window)).or_default() += q;
                }
                break (read, local, states);
            }
            commits = now_commits;
        };
        // This node's holds of the period `within` (any: a balance's), in every state of the
        // tenant: those of a period over give back to that one, and a cell not rolled since its
        // period ended holds nothing of the next.
        let held_in = |meter: &MeterId, within: Option<(i64, i64)>| -> u64 {
            states
                .iter()
                .filter_map(|s| s.quotas().find(|c| c.meter_id() == meter))
                .filter(|c| within.is_none_or(|w| c.period() == w))
                .map(|c| c.held_now())
                .sum()
        };
        let held = |meter: &MeterId| held_in(meter, None);
        // A balance as the store holds it: its grants, and the units the fleet took from it
        // (spent, or leased by a node and not used yet: this node's own lease is not used, nor
        // what its holds hold, in any state of the tenant).
        let mut balances: BTreeMap<MeterId, (u64, u64)> = BTreeMap::new();
        let (grants, found) = match state.quotas().any(|c| c.prepaid()) {
            true => self.shared().stores().request().quota.credit_grants(tenant, None).await?,
            false => (Vec::new(), Vec::new()),
        };
        for cell in state.quotas().filter(|c| c.prepaid()) {
            let meter = cell.meter_id();
            let b = found.iter().find(|(m, _)| m == meter).map(|(_, b)| *b).unwrap_or_default();
            let (_, end) = cell.period();
            let leased = if now < end { cell.lease().max(0) as u64 } else { 0 };
            balances.insert(meter.clone(), (b.granted, b.reserved.saturating_sub(leased).saturating_sub(held(meter))));
        }
        let quotas = periods
            .into_iter()
            .map(|(meter, period, start, end, limit, mode)| {
                let held = match period {
                    Period::Prepaid => held(&meter),
                    _ => held_in(&meter, Some((start, end))),
                };
                if let Some(&(granted, used)) = balances.get(&meter).filter(|_| period == Period::Prepaid) {
                    let remaining = granted.saturating_sub(used).saturating_sub(held);
                    return QuotaUsage { meter, period, start, end, limit: granted, mode, used, held, remaining };
                }
                // A meter with dimensions' total or a selector records no usage of its own: its
                // series' is its (a selector added mid-period counts what its series recorded
                // before it, which its counter did not).
                let table = &state.plan.meters;
                let sources: Vec<usize> = match table.index(meter.as_str()) {
                    // (With its own id: windows recorded before the meter had dimensions.)
                    Some(i) if !table.recorded(i) => {
                        (0..table.ids.len()).filter(|&j| j == i || (table.rollups[j] >> i) & 1 != 0).collect()
                    }
                    _ => Vec::new(),
                };
                // An open series' values count under ids of their own.
                let source = |id: &MeterId| {
                    if sources.is_empty() {
                        return *id == meter;
                    }
                    sources
                        .iter()
                        .any(|&j| table.ids[j] == *id || table.open[j].as_deref().is_some_and(|o| o.has(id.as_str())))
                };
                let sum = |m: &BTreeMap<(MeterId, i64), u64>| -> u64 {
                    m.iter().filter(|((id, w), _)| source(id) && *w >= start && *w < end).map(|(_, q)| *q).sum()
                };
                let counter = counters
                    .get(&meter)
                    .and_then(|read| read.iter().find(|c| c.key.start == start && c.key.end == end));
                // A minute is shorter than usage windows (an hour by default): its use is what
                // its counter says the nodes used, as their last calls said (a lease behind).
                let used = match period {
                    Period::Minute => counter.map_or(0, crate::store::QuotaCounter::used),
                    _ => sum(&in_periods).saturating_add(sum(&local)),
                };
                // What the usage leaves, and what the store says the fleet took (units leased by
                // other nodes and not used yet among them), whichever is less: from one read.
                let mut remaining = limit.saturating_sub(used).saturating_sub(held);
                let taken = counter.map(|c| c.reserved);
                if let Some(taken) = taken {
                    // This node's leases and spares of the period, unused, in every state of
                    // the tenant: taken from the store, and still this tenant's to use.
                    let unused: u64 = states
                        .iter()
                        .filter_map(|s| s.quotas().find(|c| c.meter_id() == &meter).map(|c| c.unused_of((start, end))))
                        .sum();
                    remaining = remaining.min(limit.saturating_sub(taken.saturating_sub(unused)));
                }
                QuotaUsage { meter, period, start, end, limit, mode, used, held, remaining }
            })
            .collect();
        let mut usage = in_range;
        for ((meter, window), q) in local {
            if window >= from && window < to {
                *usage.entry((meter, window)).or_default() += q;
            }
        }
        let usage = usage
            .into_iter()
            .filter(|(_, q)| *q > 0)
            .map(|((meter, window_start), quantity)| WindowUsage { meter, window_start, quantity })
            .collect();
        let currency = state.plan.spend.and_then(|_| rt.config.billing().currency.clone());
        // Recharges as the store keeps them (every node's claims and payments), with the
        // plan's bounds.
        let mut recharges = Vec::new();
        let plan = rt.config.plan(&state.plan.id);
        for cell in state.quotas().filter(|c| c.prepaid() && c.spec.recharged) {
            let meter = cell.meter_id();
            // Its plan changed meanwhile: nothing to show.
            let Some(spec) = plan.and_then(|p| p.recharge(meter)) else { continue };
            let counters = self.shared().stores().request().quota.counters(tenant, meter).await?;
            let currency = rt.config.billing().currency.clone().unwrap_or_default();
            recharges.push(crate::settings::recharge::view_of(tenant, meter, currency, spec.clone(), &counters, now));
        }
        // On a ladder's plan, its tier: one read of what it has paid.
        let tier = match rt.config.tier_of(&state.plan.id) {
            Some(ladder) => Some(self.tier_of(state, ladder, &rt.config, now).await?),
            None => None,
        };
        Ok(UsageReport {
            tenant: state.id.clone(),
            plan: state.plan.id.clone(),
            quotas,
            usage,
            currency,
            recharges,
            tier,
            past_due: state.past_due().map(|n| n.grace.clone()),
            own_cap,
            grants,
        })
    }
}

/// The version of the usage route's JSON (docs/usage.schema.json).
pub(crate) const USAGE_VERSION: u64 = 1;

/// The most grants of one balance the usage route lists.
pub(crate) const MAX_GRANTS_SHOWN: usize = 100;

impl Tollgate {
    /// The tenant's tier on `ladder` (its plan is on it): what it has paid and since when, and
    /// what unlocks the next (the money still to pay, the time still to wait: `None` before any
    /// payment, the wait starting with it; no next while an operator pinned its tier). One read
    /// of the ledger.
    async fn tier_of(
        &self,
        state: &Tenant,
        ladder: &crate::config::TierSpec,
        config: &crate::Config,
        now: i64,
    ) -> Result<TierView, StoreError> {
        let read = crate::store::PaymentCall::Read { tenant: state.id.clone() };
        let quota = &self.shared().stores().request().quota;
        let answer = quota.payments(&read, now).await?;
        Ok(TierView::of(ladder, &state.plan.id, &answer, config, now))
    }

    /// The body of a tenant's own usage route ([`tenant_usage`](Self::tenant_usage)), in the
    /// JSON docs/usage.schema.json describes: its report from the start of its previous
    /// billing period, each quota's `held`, `remaining` and `limit` from one read of the store
    /// and `used` from the open days' usage read with it and the closed days' as read within
    /// the last minute (they add up to at most the limit, whatever this node last heard).
    ///
    /// Also gives the body's numbers without `as_of` (what its entity tag hashes).
    ///
    /// `history` is the tenant's closed usage as the last refresh read it: taken if it is the
    /// same period's and less than a minute old, else read again (once: a `usage_range` of
    /// the closed days); the one used is given back, to keep.
    pub(crate) async fn usage_body(
        &self,
        state: &Tenant,
        history: Option<Arc<History>>,
    ) -> Result<(bytes::Bytes, Vec<u8>, Option<Arc<History>>), StoreError> {
        use serde_json::json;
        let now = self.shared().clock().unix_secs();
        // The billing period: that of the plan's first monthly quota, else the calendar month.
        let period = state
            .quotas()
            .map(|c| c.spec.period())
            .find(|p| matches!(p, Period::Month { .. }))
            .unwrap_or(Period::Month { anchor_day: 1 });
        let (start, end) = period.bounds(now);
        let (previous, _) = period.bounds(start - 1);
        let split = History::split_at(now).max(previous);
        let history = match history.filter(|h| h.serves(previous, now)) {
            Some(h) => Some(h),
            None if split > previous => {
                let read = crate::store::limited::reading(async {
                    self.shared().stores().request().usage.usage_range(&state.id, previous, split).await
                })
                .await?;
                let mut days = BTreeMap::new();
                for a in read {
                    let day = a.key.window_start - a.key.window_start.rem_euclid(86_400);
                    *days.entry((a.key.meter, day)).or_default() += a.quantity;
                }
                Some(Arc::new(History { lo: previous, split, read_at: now, days }))
            }
            None => None,
        };
        let report = self.report_of(state, previous, end, history.as_deref()).await?;
        let spend_meter = MeterId::from(crate::base::SPEND_METER);
        let cell_of = |meter: &MeterId| state.quotas().find(|c| c.meter_id() == meter);
        // A series or a selector of a meter with dimensions: its meter and values, beside its id.
        let rt = self.shared().runtime().load();
        let dimensions_of = |meter: &MeterId, item: &mut serde_json::Value| {
            let Some(spec) = rt.config.meters().iter().find(|m| m.id() == meter) else {
                // A value of an open dimension: a series of its own, named by its id.
                let values = crate::config::series_values(meter);
                let of = meter.as_str().split_once('{').map(|(of, _)| of);
                if let (Some(of), false) = (of, values.is_empty()) {
                    if rt.config.meters().iter().any(|m| m.id().as_str() == of && m.dimensions().is_some()) {
                        item["of"] = of.into();
                        item["dimensions"] = values.into_iter().map(|(n, v)| (n, serde_json::Value::from(v))).collect();
                    }
                }
                return;
            };
            let Some(of) = spec.series_of() else { return };
            item["of"] = of.as_str().into();
            item["dimensions"] = spec
                .values()
                .map(|(n, v)| (n.to_owned(), serde_json::Value::from(v)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        };
        let mode = |m: QuotaMode| if m == QuotaMode::Hard { "hard" } else { "soft" };
        let quotas: Vec<serde_json::Value> = report
            .quotas
            .iter()
            .filter(|q| q.meter != spend_meter)
            .map(|q| {
                let prepaid = q.period == Period::Prepaid;
                let (limit, remaining) = (q.limit, q.remaining);
                let mut item = json!({
                    "meter": q.meter.as_str(),
                    "period": q.period.name(),
                    "start": (!prepaid).then_some(q.start),
                    "reset": (!prepaid).then_some(q.end),
                    "limit": limit,
                    "mode": mode(q.mode),
                    "used": q.used,
                    "held": q.held,
                    "remaining": remaining,
                });
                dimensions_of(&q.meter, &mut item);
                item
            })
            .collect();
        let balances: Vec<serde_json::Value> = report
            .quotas
            .iter()
            .filter(|q| q.period == Period::Prepaid)
            .map(|q| {
                // Open grants in spending order, then closed ones, the latest closed first; at
                // most `MAX_GRANTS_SHOWN` (the body of a view stays bounded).
                let mut listed: Vec<&crate::store::CreditGrant> =
                    report.grants.iter().filter(|g| g.meter == q.meter && g.closed.is_none()).collect();
                let mut closed: Vec<&crate::store::CreditGrant> =
                    report.grants.iter().filter(|g| g.meter == q.meter && g.closed.is_some()).collect();
                closed.sort_by_key(|g| std::cmp::Reverse(g.closed.map_or(0, |c| c.at)));
                listed.extend(closed);
                let omitted = listed.len().saturating_sub(MAX_GRANTS_SHOWN);
                listed.truncate(MAX_GRANTS_SHOWN);
                let grants: Vec<serde_json::Value> = listed
                    .into_iter()
                    .map(|g| {
                        json!({
                            "id": g.id,
                            "units": g.units,
                            "bought": g.bought,
                            "granted_at": g.granted_at,
                            "expires_at": g.expires_at,
                            "refunded": g.taken,
                            "takes": g.takes.iter().map(|t| json!({
                                "id": t.id, "units": t.units, "took": t.removed, "unspent": t.unspent,
                                "given_back": t.given_back,
                            })).collect::<Vec<_>>(),
                            "closed": g.closed.zip(g.closed_as()).map(|(c, how)| json!({
                                "at": c.at,
                                "reason": how.as_str(),
                                "lost": c.lost,
                            })),
                        })
                    })
                    .collect();
                let recharge = report.recharges.iter().find(|r| r.meter == q.meter).map(RechargeView::to_json);
                json!({ "meter": q.meter.as_str(), "grants": grants, "grants_omitted": omitted, "recharge": recharge })
            })
            .collect();
        let spend = report.quotas.iter().find(|q| q.meter == spend_meter).and_then(|q| {
            let spec = cell_of(&q.meter)?.spec;
            let cap = crate::settings::caps::view(
                spec,
                report.currency.clone().unwrap_or_default(),
                spec.cap_max,
                report.own_cap,
            );
            let remaining = q.remaining;
            let money = |nanos: u64| crate::base::amount_of(nanos).to_string();
            let mut cap = cap.to_json();
            cap["spent"] = money(q.used).into();
            cap["remaining"] = money(remaining).into();
            cap["period"] = q.period.name().into();
            cap["start"] = q.start.into();
            cap["reset"] = q.end.into();
            Some(cap)
        });
        // Per meter: each UTC day's usage, and the totals of both periods.
        let mut days: BTreeMap<&MeterId, BTreeMap<i64, u64>> = BTreeMap::new();
        for w in &report.usage {
            if w.meter != spend_meter {
                *days.entry(&w.meter).or_default().entry(w.window_start.div_euclid(86_400) * 86_400).or_default() +=
                    w.quantity;
            }
        }
        let day_name = |day: i64| {
            chrono::DateTime::from_timestamp(day, 0).map_or_else(String::new, |d| d.format("%Y-%m-%d").to_string())
        };
        let usage: Vec<serde_json::Value> = days
            .iter()
            .map(|(meter, days)| {
                let total = |lo: i64, hi: i64| -> u64 { days.range(lo..hi).map(|(_, q)| *q).sum() };
                let mut item = json!({
                    "meter": meter.as_str(),
                    "current": total(start, end),
                    "previous": total(previous, start),
                    "daily": days.iter().map(|(d, q)| json!({ "day": day_name(*d), "quantity": q })).collect::<Vec<_>>(),
                });
                dimensions_of(meter, &mut item);
                item
            })
            .collect();
        let mut body = json!({
            "version": USAGE_VERSION,
            "tenant": report.tenant.as_str(),
            "plan": report.plan.as_str(),
            "periods": {
                "current": { "start": start, "end": end },
                // Usage is kept 63 days: the previous period's, whole (an older start would not
                // be all there).
                "previous": {
                    "start": previous,
                    "end": start,
                    "complete": previous >= now - crate::store::contract::USAGE_KEPT_SECS,
                },
            },
            "quotas": quotas,
            "balances": balances,
            "spend": spend,
            "usage": usage,
        });
        if let Some(tier) = &report.tier {
            let money = |minor: u64| crate::base::money_text(minor, &tier.currency);
            let next = tier.next.as_ref().map(|n| {
                json!({
                    "plan": n.plan.as_str(),
                    "paid_left": money(n.paid_left),
                    "wait_secs": n.wait.map(|w| w.as_secs()),
                })
            });
            body["tier"] = json!({
                "ladder": tier.ladder,
                "paid": money(tier.paid),
                "currency": tier.currency,
                "since": tier.since,
                "next": next,
            });
            if tier.pinned {
                body["tier"]["pinned"] = true.into();
            }
        }
        if let Some(grace) = &report.past_due {
            body["past_due"] = json!({
                "until": grace.until,
                "plan": grace.plan.as_str(),
            });
        }
        let numbers = body.to_string().into_bytes();
        body["as_of"] = now.into();
        Ok((bytes::Bytes::from(body.to_string()), numbers, history))
    }
}
