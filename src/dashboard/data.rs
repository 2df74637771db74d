//! What each page shows, read through [`Admin`] (and, for a mounted router, the engine's own
//! counters): typed values the pages render, tested apart from the HTML.

use std::time::{Duration, Instant};

use crate::{
    admin::{Admin, AdminError, TenantSearch},
    base::{MeterId, Period, PlanId, QuotaMode, RejectionKind, TenantId},
    config::{Config, PlanSpec},
    engine::Tollgate,
    metrics::Stats,
    settings::{
        caps::{limit_in_force, SpendCapView},
        plan::{file_record, served},
        recharge::RechargeView,
    },
    store::{AlertQuery, AlertState, ApiKeyRecord, CreditGrant, DeadLetter, LedgerEntry, OutboxEntry, QuotaCounter},
    store::{AuditCursor, AuditRecord, TenantRecord, UsageAggregate},
};

/// Tenants per page of the list.
pub(crate) const PAGE: usize = 25;
/// Rows per table of the billing and alerts pages.
pub(crate) const ROWS: usize = 100;
/// Hours of the hourly chart.
pub(crate) const HOURS: i64 = 48;
/// Days of the daily chart.
pub(crate) const DAYS: i64 = 30;
/// Hours of the ledger the billing page reads for reconciliation's findings.
pub(crate) const LEDGER_HOURS: u32 = 48;
/// About the most usage rows a tenant's page reads: its daily chart covers fewer days when
/// the usage window is short.
pub(crate) const MAX_ROWS: i64 = 50_000;

/// A tenant's quota or balance in its current period, as the quota store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gauge {
    pub(crate) meter: MeterId,
    pub(crate) period: Period,
    pub(crate) mode: QuotaMode,
    /// The limit (a balance: its granted units).
    pub(crate) limit: u64,
    /// Units used: reserved by the fleet, less what nodes keep unspent (leased, held, jobs).
    pub(crate) used: u64,
    /// Units the nodes keep and have not used: reserved, not spent.
    pub(crate) kept: u64,
    /// The period's bounds (a balance: none shown).
    pub(crate) start: i64,
    pub(crate) end: i64,
}

impl Gauge {
    /// Whether nothing is left: used (never what is only reserved) at or past the limit.
    pub(crate) fn reached(&self) -> bool {
        self.used >= self.limit
    }
}

/// One row of the tenants' list.
#[derive(Debug, Clone)]
pub(crate) struct TenantRow {
    pub(crate) record: TenantRecord,
    /// Why a search found it.
    pub(crate) why: Option<String>,
    /// Each prepaid balance: (meter, units left, granted).
    pub(crate) balances: Vec<(MeterId, u64, u64)>,
    /// `active`, `unknown plan`, `quota reached`, `balance empty`.
    pub(crate) state: &'static str,
    /// The fleet's refusals of it today (since midnight UTC), as the nodes' tallies add up;
    /// `None` when they could not be read.
    pub(crate) refusals: Option<u64>,
}

/// The states a tenant of the list is in, in the order a sort by state shows them.
pub(crate) const STATES: [&str; 4] = ["balance empty", "quota reached", "unknown plan", "active"];

/// The most tenants a filtered or sorted list reads for one page (the directory's, in id
/// order, from where the page starts, with the file's among them): the filter and the order
/// apply among them, every match is shown, and the next page reads the next ones.
pub(crate) const WINDOW: usize = 200;

/// How the list of tenants is ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Sort {
    /// By id (the directory's order).
    #[default]
    Id,
    /// By plan, then id.
    Plan,
    /// The least units left in a balance first (a balance never granted has 0 left); tenants
    /// whose plan has no balance last.
    Balance,
    /// The most refusals today first (the fleet's).
    Refusals,
    /// In the order of [`STATES`]: the ones that need a look first.
    State,
}

impl Sort {
    /// Every order, as the form lists them.
    pub(crate) const ALL: [Sort; 5] = [Sort::Id, Sort::Plan, Sort::Balance, Sort::Refusals, Sort::State];

    /// Its name in the address (`?sort=`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Sort::Id => "id",
            Sort::Plan => "plan",
            Sort::Balance => "balance",
            Sort::Refusals => "refusals",
            Sort::State => "state",
        }
    }

    /// How the page says it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Sort::Id => "by id",
            Sort::Plan => "by plan",
            Sort::Balance => "least balance left first",
            Sort::Refusals => "most refusals today first",
            Sort::State => "needing a look first",
        }
    }

    /// The order named `name`.
    pub(crate) fn parse(name: &str) -> Option<Sort> {
        Sort::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What the list page is asked to show: tenants on one plan, in one state, in an order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ListView {
    pub(crate) plan: Option<String>,
    /// One of [`STATES`].
    pub(crate) state: Option<&'static str>,
    pub(crate) sort: Sort,
}

impl ListView {
    /// The view the address asks for: an empty or unknown value is no filter (or the order by
    /// id), so a hand-edited address never fails.
    pub(crate) fn from_query(plan: Option<String>, state: Option<String>, sort: Option<String>) -> Self {
        Self {
            plan: plan.filter(|p| !p.trim().is_empty()),
            state: state.and_then(|s| STATES.into_iter().find(|k| *k == s)),
            sort: sort.as_deref().and_then(Sort::parse).unwrap_or_default(),
        }
    }

    /// Whether it narrows or orders anything.
    pub(crate) fn is_plain(&self) -> bool {
        self.plan.is_none() && self.state.is_none() && self.sort == Sort::Id
    }
}

/// The tenants page.
#[derive(Debug, Clone, Default)]
pub(crate) struct TenantsData {
    pub(crate) search: Option<TenantSearch>,
    pub(crate) rows: Vec<TenantRow>,
    /// The last id of a full page: where the next page starts.
    pub(crate) next: Option<TenantId>,
    /// How the list is narrowed and ordered.
    pub(crate) view: ListView,
    /// A filtered or sorted list: how many tenants it read ([`WINDOW`] at most), and how many
    /// of them matched (all shown).
    pub(crate) window: Option<(usize, usize)>,
    /// The plans of the configuration, for the filter.
    pub(crate) plans: Vec<String>,
}

/// One tenant's page.
#[derive(Debug, Clone)]
pub(crate) struct TenantData {
    pub(crate) record: TenantRecord,
    pub(crate) plan_known: bool,
    pub(crate) keys: Vec<ApiKeyRecord>,
    pub(crate) gauges: Vec<Gauge>,
    /// At most [`ROWS`] of its credit grants, open ones first.
    pub(crate) grants: Vec<CreditGrant>,
    /// The billing currency (`[billing] currency`), for money shown.
    pub(crate) currency: Option<String>,
    /// How many grants the store holds (open ones are at most
    /// [`OPEN_GRANTS_MAX`](crate::store::contract::OPEN_GRANTS_MAX) per balance).
    pub(crate) grants_total: usize,
    pub(crate) cap: Option<SpendCapView>,
    pub(crate) recharges: Vec<RechargeView>,
    /// On a ladder's plan, its tier (`[tiers.NAME]`).
    pub(crate) tier: Option<crate::report::TierView>,
    /// Past due within its grace (`[stripe] past_due_grace`).
    pub(crate) past_due: Option<crate::store::PastDue>,
    /// Per meter, its usage in each of the last [`HOURS`] hours.
    pub(crate) hourly: Vec<(MeterId, Vec<(i64, u64)>)>,
    /// Per meter, its usage in each of the last [`DAYS`] days (fewer with a short usage window).
    pub(crate) daily: Vec<(MeterId, Vec<(i64, u64)>)>,
    /// This node's refusals of it among its last ones, by kind, and since when (a mounted
    /// router's only).
    pub(crate) rejections: Option<Refusals>,
    /// Its requests today (since midnight UTC), the whole fleet's: its tally, if it has one,
    /// or why it could not be read.
    pub(crate) today: Result<Option<crate::store::Tally>, String>,
    /// Its quotas as its own usage route reads them on this node (a mounted router's only).
    pub(crate) route: Option<RouteView>,
    /// Each meter with dimensions: its usage per series in the days read (the charts show
    /// the meter's total).
    pub(crate) breakdowns: Vec<Breakdown>,
    /// Its last [`TENANT_CHANGES`] changes in the audit, newest first, or why they were not
    /// read.
    pub(crate) changes: Result<Vec<AuditRecord>, String>,
}

/// The changes of the audit a tenant's page shows.
pub(crate) const TENANT_CHANGES: usize = 10;

/// The changes of the audit a page of `/audit` shows.
pub(crate) const AUDIT_ROWS: usize = 100;

/// A page of the audit: its records, newest first, and where the next page starts.
#[derive(Debug, Default)]
pub(crate) struct AuditData {
    /// Only this tenant's (`?tenant=`).
    pub(crate) tenant: Option<String>,
    pub(crate) records: Vec<AuditRecord>,
    /// The cursor of the next page (`?before=`), if there may be one.
    pub(crate) next: Option<String>,
}

/// A record's place as the address carries it: `AT.SEQ.TENANT` (the tenant last: it may hold
/// dots).
pub(crate) fn cursor_text(c: &AuditCursor) -> String {
    format!("{}.{}.{}", c.at, c.seq, c.tenant)
}

fn cursor_of(text: &str) -> Option<AuditCursor> {
    let mut parts = text.splitn(3, '.');
    // Within what a store writes: a time and a number at or above 0.
    let at = parts.next()?.parse::<i64>().ok().filter(|at| *at >= 0)?;
    let seq = parts.next()?.parse::<i64>().ok().filter(|seq| *seq >= 0)?;
    let tenant = TenantId::from(parts.next().filter(|t| TenantId::is_valid(t))?);
    Some(AuditCursor { at, tenant, seq })
}

/// The audit's page: [`AUDIT_ROWS`] records, `tenant`'s or the fleet's, after `before`. A
/// tenant id or cursor that is not one reads the first page of the fleet.
pub(crate) async fn audit(admin: &Admin, tenant: Option<&str>, before: Option<&str>) -> Result<AuditData, AdminError> {
    let tenant = tenant.filter(|t| TenantId::is_valid(t));
    let records = admin.audit(tenant, before.and_then(cursor_of), AUDIT_ROWS).await?;
    let next = (records.len() == AUDIT_ROWS).then(|| records.last().map(|r| cursor_text(&r.cursor()))).flatten();
    Ok(AuditData { tenant: tenant.map(str::to_owned), records, next })
}

/// The most series a breakdown shows (the largest first): a meter has at most the product of
/// its dimensions' values, and an open dimension's values are at most 1,000 a tenant a month.
pub(crate) const SERIES_SHOWN: usize = 100;

/// A meter with dimensions' usage per series (`tokens{model=m-large,kind=output}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Breakdown {
    pub(crate) meter: MeterId,
    /// Its dimensions' names, in their order.
    pub(crate) dimensions: Vec<String>,
    /// Each series with usage: its values (in the dimensions' order), its usage in the windows
    /// started in the last 24 hours, and in every window read; the most used first, at most
    /// [`SERIES_SHOWN`].
    pub(crate) series: Vec<(Vec<String>, u64, u64)>,
    /// How many series had usage (more than shown when past [`SERIES_SHOWN`]).
    pub(crate) total: usize,
    /// The seconds read (since the first window read).
    pub(crate) span: i64,
}

/// `rows` with each series' usage counted in its meter (`tokens{model=m-large}` in `tokens`),
/// for the charts; and each meter with dimensions' breakdown by series since `from`, the
/// windows started in the last 24 hours before `now` apart. Only the series of a meter the
/// configuration declares with dimensions, named in its dimensions' order, are grouped: any
/// other row stays as it is.
pub(crate) fn by_series(
    config: Option<&Config>,
    rows: &[UsageAggregate],
    now: i64,
    from: i64,
) -> (Vec<UsageAggregate>, Vec<Breakdown>) {
    // Per meter: its dimensions' names, and per series (its values) its usage (last 24 hours,
    // all read).
    type Sums = std::collections::BTreeMap<Vec<String>, (u64, u64)>;
    let mut found: std::collections::BTreeMap<MeterId, (Vec<String>, Sums)> = std::collections::BTreeMap::new();
    let mut merged = Vec::with_capacity(rows.len());
    for a in rows {
        let series =
            crate::config::parse_selector(a.key.meter.as_str()).and_then(Result::ok).and_then(|(meter, pairs)| {
                let spec = config?.meters().iter().find(|m| m.id().as_str() == meter)?;
                let names: Vec<&str> = spec.dimensions()?.names().collect();
                let same = names.len() == pairs.len() && names.iter().zip(&pairs).all(|(n, (m, _))| n == m);
                same.then(|| (spec.id().clone(), names, pairs))
            });
        let Some((meter, names, pairs)) = series else {
            merged.push(a.clone());
            continue;
        };
        let entry = found.entry(meter.clone()).or_default();
        if entry.0.is_empty() {
            entry.0 = names.iter().map(|n| (*n).to_owned()).collect();
        }
        let sums = entry.1.entry(pairs.iter().map(|(_, v)| (*v).to_owned()).collect()).or_default();
        if a.key.window_start >= now - 86_400 {
            sums.0 = add(sums.0, a.quantity);
        }
        sums.1 = add(sums.1, a.quantity);
        let mut total = a.clone();
        total.key.meter = meter;
        merged.push(total);
    }
    let breakdowns = found
        .into_iter()
        .map(|(meter, (dimensions, sums))| {
            let mut series: Vec<(Vec<String>, u64, u64)> =
                sums.into_iter().map(|(v, (day, all))| (v, day, all)).collect();
            // The most used first; ties in the values' order.
            series.sort_by_key(|s| std::cmp::Reverse(s.2));
            let total = series.len();
            series.truncate(SERIES_SHOWN);
            Breakdown { meter, dimensions, series, total, span: now - from }
        })
        .collect();
    (merged, breakdowns)
}

/// A tenant's quotas as its usage route reads them on the node that serves the page.
#[derive(Debug, Clone)]
pub(crate) enum RouteView {
    /// Read now (the spend meter left out: the route answers it as money, in `spend`).
    Read(Vec<crate::report::QuotaUsage>),
    /// The node holds no state of the tenant (it has not served it lately): nothing read, so
    /// that a page never makes a tenant resident.
    NotHeld,
    /// The store did not answer.
    Failed,
}

/// A tenant's refusals among this node's last ones, by kind, with the time of the oldest kept.
pub(crate) type Refusals = (Vec<(RejectionKind, u64)>, Option<i64>);

/// The billing page.
#[derive(Debug, Clone, Default)]
pub(crate) struct BillingData {
    pub(crate) sink: String,
    pub(crate) pending: Vec<UsageAggregate>,
    pub(crate) dead: Vec<DeadLetter>,
    pub(crate) lacking: Vec<LedgerEntry>,
    /// Whether the ledger scan stopped at its bound with hours left unread.
    pub(crate) lacking_cut: bool,
}

/// The most tenants the money page reads for one page (the directory's, in id order, from
/// where the page starts, with the file's among them). Each costs one counters read per meter
/// of money on its plan (its spend and its prepaid balances; an idle tenant's cap, with no spend
/// counters in the period, a directory read and a reservation of nothing more, as its page
/// reads it), one read of its grants (a plan with a balance) and one of its payments (with
/// `[stripe]`).
pub(crate) const MONEY_WINDOW: usize = 50;

/// A tenant's spend in its current period against its cap in force.
#[derive(Debug, Clone)]
pub(crate) struct SpendRow {
    pub(crate) tenant: TenantId,
    pub(crate) plan: PlanId,
    /// Spent and the cap in force, in nano-units of the currency.
    pub(crate) spent: u64,
    pub(crate) cap: u64,
    pub(crate) hard: bool,
    /// Whether the cap in force is the tenant's own.
    pub(crate) own: bool,
    pub(crate) period: Period,
}

/// A tenant's prepaid balance and its grants.
#[derive(Debug, Clone)]
pub(crate) struct BalanceRow {
    pub(crate) tenant: TenantId,
    pub(crate) meter: MeterId,
    /// Units left of those its open grants granted.
    pub(crate) left: u64,
    pub(crate) granted: u64,
    /// Its open grants, and when the soonest of them expires.
    pub(crate) open: usize,
    pub(crate) expires: Option<i64>,
    /// When it was last granted.
    pub(crate) last: Option<i64>,
}

/// What a tenant's payments and grants lost to a refund, a dispute or a credit.
#[derive(Debug, Clone)]
pub(crate) enum Reversal {
    /// A payment refunded (its running total) or disputed, in the currency's smallest unit (a
    /// reversal of a payment not seen yet has an `amount` of 0).
    Payment { payment: String, amount: u64, at: i64, refunded: u64, disputes: Vec<crate::store::DisputeMark> },
    /// Units a grant lost: to its payment's refunds (`refunded`: the grant's `taken`), or to a
    /// take (a dispute's, a proration credit's).
    Grant { meter: MeterId, grant: String, bought: u64, refunded: u64, takes: Vec<crate::store::CreditTake> },
}

/// The money page: what the tenants of one window of the directory spend, hold, recharge,
/// paid and had given back.
#[derive(Debug, Clone, Default)]
pub(crate) struct MoneyData {
    /// The billing currency (`[billing] currency`).
    pub(crate) currency: Option<String>,
    /// Tenants read (at most [`MONEY_WINDOW`]) and where the next page starts.
    pub(crate) read: usize,
    pub(crate) next: Option<TenantId>,
    /// Spend against caps, the most used first.
    pub(crate) spend: Vec<SpendRow>,
    /// Balances, the least left first.
    pub(crate) balances: Vec<BalanceRow>,
    /// Recharges, those open first, then those off, failing, on.
    pub(crate) recharges: Vec<RechargeView>,
    /// The tenants' payments today (since midnight UTC), in the currency's smallest unit,
    /// before refunds and disputes: (count, amount).
    pub(crate) paid_today: (usize, u64),
    /// Refunds, disputes and credits, newest payment first.
    pub(crate) reversals: Vec<(TenantId, Reversal)>,
    /// Whether payments were read (`[stripe]` is configured: Stripe's webhooks record them).
    pub(crate) payments_read: bool,
    /// The tenants whose money could not be read, and why.
    pub(crate) unreadable: Vec<(TenantId, String)>,
}

impl MoneyData {
    /// Where a recharge stands, in the order the page lists them (open first).
    pub(crate) fn recharge_rank(view: &RechargeView) -> u8 {
        match (&view.state.open, view.off_reason(), view.state.failures) {
            (Some(_), _, _) => 0,
            (None, Some(_), _) => 1,
            (None, None, n) if n > 0 => 2,
            _ => 3,
        }
    }
}

/// The money page: the tenants of one window of [`MONEY_WINDOW`] after `after`, each with money
/// on its plan read (a plan the configuration lacks has none). A tenant whose money cannot be
/// read is named in [`MoneyData::unreadable`], the others shown.
pub(crate) async fn money(admin: &Admin, after: Option<&str>) -> Result<MoneyData, AdminError> {
    let now = admin.clock().unix_secs();
    let config = admin.config();
    let currency = config.and_then(|c| c.billing().currency.clone());
    let payments_read = config.is_some_and(|c| c.stripe().is_some());
    let (records, next) = window(admin, after, MONEY_WINDOW).await?;
    let mut data =
        MoneyData { currency: currency.clone(), read: records.len(), next, payments_read, ..MoneyData::default() };
    for (record, _) in records {
        if let Err(e) = tenant_money(admin, &record, now, &mut data).await {
            tracing::warn!(tenant = %record.id, error = %e, "dashboard: a tenant's money could not be read");
            data.unreadable.push((record.id.clone(), e.to_string()));
        }
    }
    // The most used cap first (as a share of it), the least left balance first, open
    // recharges first: what needs a look on top. Ties stay in id order.
    let share =
        |spent: u64, cap: u64| if cap == 0 { u128::MAX } else { u128::from(spent) * 1_000_000 / u128::from(cap) };
    data.spend.sort_by_key(|r| std::cmp::Reverse(share(r.spent, r.cap)));
    data.balances.sort_by_key(|r| r.left);
    data.recharges.sort_by_key(MoneyData::recharge_rank);
    data.reversals.sort_by_key(|(_, r)| {
        std::cmp::Reverse(match r {
            Reversal::Payment { at, .. } => *at,
            Reversal::Grant { .. } => i64::MIN,
        })
    });
    Ok(data)
}

/// One tenant's money, added to `data` (nothing of it when a read fails).
async fn tenant_money(admin: &Admin, record: &TenantRecord, now: i64, data: &mut MoneyData) -> Result<(), AdminError> {
    let config = admin.config();
    let id = &record.id;
    let today = now - now.rem_euclid(86_400);
    let (mut spend, mut balances, mut recharges, mut reversals) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    if let Some(plan) = plan_of(config, record) {
        let prepaid: Vec<&MeterId> =
            plan.quotas().iter().filter(|(_, q)| q.period() == Period::Prepaid).map(|(m, _)| m).collect();
        let mut counters = Vec::new();
        for meter in &prepaid {
            counters.extend(admin.meter_counters(id, meter).await?);
        }
        // The cap in force from the spend counters read; an idle tenant's (no counters in the
        // period: swept, its own cap kept) through the cap's own read, as its page reads it.
        let cap = match plan.spend() {
            Some(spec) => {
                let spent = admin.meter_counters(id, &crate::base::SPEND_METER.into()).await?;
                let view = match spent.is_empty() {
                    true => admin.spend_cap(id.as_str()).await?,
                    false => crate::settings::caps::view(
                        spec,
                        data.currency.clone().unwrap_or_default(),
                        plan.spend_max().unwrap_or(spec.limit().get()),
                        spent.iter().find_map(|c| c.cap),
                    ),
                };
                counters.extend(spent);
                Some(view)
            }
            None => None,
        };
        let grants = match prepaid.is_empty() {
            true => Vec::new(),
            false => admin.credits(id.as_str()).await?.0,
        };
        for g in gauges(&plan, &counters, cap.as_ref(), now) {
            if g.meter.as_str() == crate::base::SPEND_METER {
                spend.push(SpendRow {
                    tenant: id.clone(),
                    plan: record.plan.clone(),
                    spent: g.used,
                    cap: g.limit,
                    hard: g.mode == QuotaMode::Hard,
                    own: cap.as_ref().is_some_and(|c| c.own_in_force),
                    period: g.period,
                });
            } else if g.period == Period::Prepaid {
                let open: Vec<&CreditGrant> =
                    grants.iter().filter(|c| c.meter == g.meter && c.closed.is_none()).collect();
                balances.push(BalanceRow {
                    tenant: id.clone(),
                    meter: g.meter.clone(),
                    left: g.limit.saturating_sub(g.used),
                    granted: g.limit,
                    open: open.len(),
                    expires: open.iter().filter_map(|c| c.expires_at).min(),
                    last: grants.iter().filter(|c| c.meter == g.meter).map(|c| c.granted_at).max(),
                });
            }
        }
        for (meter, spec) in plan.recharges() {
            let mine: Vec<_> = counters.iter().filter(|c| c.key.meter == *meter).cloned().collect();
            let currency = data.currency.clone().unwrap_or_default();
            recharges.push(crate::settings::recharge::view_of(id, meter, currency, spec.clone(), &mine, now));
        }
        // Units a grant lost: to its payment's refunds (`taken`) or to takes apart.
        for g in grants.iter().filter(|g| g.taken > 0 || !g.takes.is_empty()) {
            reversals.push((
                id.clone(),
                Reversal::Grant {
                    meter: g.meter.clone(),
                    grant: g.id.clone(),
                    bought: g.bought,
                    refunded: g.taken,
                    takes: g.takes.clone(),
                },
            ));
        }
    }
    let mut paid_today = (0, 0);
    if data.payments_read {
        let row = admin.payments(id.as_str()).await?;
        for p in &row.payments {
            if p.at >= today && p.amount > 0 {
                paid_today.0 += 1;
                paid_today.1 = add(paid_today.1, p.amount);
            }
        }
        for p in row.payments.iter().chain(&row.orphans) {
            if p.refunded > 0 || !p.disputes.is_empty() {
                reversals.push((
                    id.clone(),
                    Reversal::Payment {
                        payment: p.id.clone(),
                        amount: p.amount,
                        at: p.at,
                        refunded: p.refunded,
                        disputes: p.disputes.clone(),
                    },
                ));
            }
        }
    }
    data.spend.extend(spend);
    data.balances.extend(balances);
    data.recharges.extend(recharges);
    data.reversals.extend(reversals);
    data.paid_today.0 += paid_today.0;
    data.paid_today.1 = add(data.paid_today.1, paid_today.1);
    Ok(())
}

/// The most tenants the plans page reads to count them per version.
pub(crate) const PLAN_SCAN: usize = 10_000;

/// The plans page: per version of each plan, its tenants and what the file says of it.
#[derive(Debug, Clone, Default)]
pub(crate) struct PlansData {
    /// (plan, version, tenants, note).
    pub(crate) rows: Vec<(String, u32, u64, &'static str)>,
    /// Tenants read, and whether that was all of them.
    pub(crate) read: usize,
    pub(crate) complete: bool,
}

/// The plans page: a read of the directory's first [`PLAN_SCAN`] tenants, counted per version
/// of their plans, with the versions the file declares and no tenant is on.
pub(crate) async fn plans(admin: &Admin) -> Result<PlansData, AdminError> {
    let found = admin.plan_versions(PLAN_SCAN).await?;
    let mut counts = found.counts;
    if let Some(config) = admin.config() {
        for p in config.plans().values() {
            counts.entry(p.id().name().to_owned()).or_default().entry(p.version()).or_default();
        }
    }
    let mut rows = Vec::new();
    for (plan, versions) in counts {
        for (version, n) in versions {
            let id = PlanId::at_version(&plan, version);
            let note = match admin.config().map(|c| (c.plans().get(&id), c.put_on(&plan).is_some())) {
                None => "",
                Some((Some(p), _)) if p.is_current() => "current",
                Some((Some(_), _)) => "earlier version",
                Some((None, true)) => "not declared: served the current version",
                Some((None, false)) => "not in the configuration",
            };
            rows.push((plan.clone(), version, n, note));
        }
    }
    Ok(PlansData { rows, read: found.read, complete: found.complete })
}

/// The alerts page: each state's rows, at most [`ROWS`] each.
#[derive(Debug, Clone, Default)]
pub(crate) struct AlertsData {
    pub(crate) pending: Vec<OutboxEntry>,
    pub(crate) delivered: Vec<OutboxEntry>,
    pub(crate) dead: Vec<OutboxEntry>,
}

/// The node's page.
#[derive(Debug, Clone)]
pub(crate) struct NodeData {
    pub(crate) stats: Stats,
    /// Each role's store: how long a read took, or why it failed.
    pub(crate) health: Vec<(&'static str, Result<Duration, String>)>,
    /// The billing currency, for the money flushed.
    pub(crate) currency: Option<String>,
}

/// The tenant `id` as the configuration file declares it (`[tenants.ID]`), as a record.
fn file_tenant(config: Option<&Config>, id: &str) -> Option<TenantRecord> {
    file_record(config?, &TenantId::from(id))
}

/// The tenants the configuration file declares that the directory does not hold, in id order
/// after `after`, matching `keep`: at most [`PAGE`] of them looked up (one directory read
/// each), and whether more were left.
async fn file_tenants(
    admin: &Admin,
    after: Option<&str>,
    keep: impl Fn(&TenantRecord) -> bool,
) -> Result<(Vec<TenantRecord>, bool), AdminError> {
    let mut out = Vec::new();
    let Some(config) = admin.config() else { return Ok((out, false)) };
    let mut ids: Vec<&str> =
        config.tenants().iter().map(|s| s.id().as_str()).filter(|id| after.is_none_or(|a| *id > a)).collect();
    ids.sort_unstable();
    let mut looked = 0;
    for id in ids {
        let Some(record) = file_tenant(Some(config), id) else { continue };
        if !keep(&record) {
            continue;
        }
        if looked == PAGE {
            return Ok((out, true));
        }
        looked += 1;
        if admin.tenant(id).await?.is_none() {
            out.push(record);
        }
    }
    Ok((out, false))
}

/// The plan `record` is served, with the overrides that fit it, as the engine serves it
/// (`None`: the configuration has no such plan, or the overrides cannot be read: the engine
/// refuses the tenant).
fn plan_of(config: Option<&Config>, record: &TenantRecord) -> Option<PlanSpec> {
    let config = config?;
    // The file's tenant first, as the engine and `Admin` read it.
    let file = file_record(config, &record.id);
    served(config, file.as_ref().unwrap_or(record)).ok().map(|s| s.spec)
}

/// Units added without overflow.
fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b)
}

/// The gauges of `plan`'s quotas from `counters` at `now`, each against its limit in force
/// ([`limit_in_force`]: a balance's granted units, a spend quota's cap in force: the tenant's
/// own cap as `cap` read it, else as the counters keep it).
pub(crate) fn gauges(plan: &PlanSpec, counters: &[QuotaCounter], cap: Option<&SpendCapView>, now: i64) -> Vec<Gauge> {
    let mut out = Vec::new();
    for (meter, spec) in plan.quotas() {
        let period = spec.period();
        let (start, end) = period.bounds(now);
        let counter = counters
            .iter()
            .find(|c| c.key.meter == *meter && (c.granted.is_some() || (c.key.start <= now && now < c.key.end)));
        let (used, kept) = counter.map_or((0, 0), |c| (c.used(), c.kept.total()));
        // An idle tenant's counters are swept and its own cap kept: a cap read says it.
        let own = match cap {
            Some(view) if spec.capped => view.own,
            _ => counters.iter().filter(|c| c.key.meter == *meter).find_map(|c| c.cap),
        };
        let (limit, mode) = limit_in_force(spec, counter.and_then(|c| c.granted), own);
        out.push(Gauge { meter: meter.clone(), period, mode, limit, used, kept, start, end });
    }
    out
}

/// The tenants page: a search's findings, or a page of the directory after `after`; narrowed
/// and ordered as `view` asks, among at most [`WINDOW`] tenants read.
pub(crate) async fn tenants(
    admin: &Admin,
    search: Option<&str>,
    after: Option<&str>,
    view: ListView,
) -> Result<TenantsData, AdminError> {
    let mut data = TenantsData {
        plans: admin.config().map(|c| c.plans().keys().map(ToString::to_string).collect()).unwrap_or_default(),
        ..TenantsData::default()
    };
    let records: Vec<(TenantRecord, Option<String>)> = match search.filter(|s| !s.trim().is_empty()) {
        Some(text) => {
            let found = admin.search_tenants_after(text, after, PAGE).await?;
            let mut records: Vec<_> = found.found.iter().map(|(t, why)| (t.clone(), Some(why.clone()))).collect();
            let cut = found.text.as_str();
            let matching = |t: &TenantRecord| {
                t.id.as_str().starts_with(cut)
                    || t.customer.as_deref() == Some(cut)
                    || t.metronome_customer.as_deref() == Some(cut)
            };
            if after.is_none() {
                for t in file_tenants(admin, None, matching).await?.0 {
                    records.push((t, Some("declared in the configuration file".to_owned())));
                }
            }
            data.next = found.next.clone();
            data.search = Some(found);
            records
        }
        None if view.is_plain() => {
            // The directory's next page and the file's tenants it lacks, merged in id order: the
            // first PAGE of either holds the first PAGE of both.
            let page = admin.list_tenants(after, PAGE).await?;
            let full = page.len() == PAGE;
            let (file, cut) = file_tenants(admin, after, |_| true).await?;
            let mut records: Vec<_> = file
                .into_iter()
                .map(|t| (t, Some("declared in the configuration file".to_owned())))
                .chain(page.into_iter().map(|t| (t, None)))
                .collect();
            records.sort_by(|a, b| a.0.id.as_str().cmp(b.0.id.as_str()));
            if full || cut || records.len() > PAGE {
                records.truncate(PAGE);
                data.next = records.last().map(|(t, _)| t.id.clone());
            }
            records
        }
        None => {
            let (records, next) = window(admin, after, WINDOW).await?;
            data.window = Some((records.len(), 0));
            data.next = next;
            records
        }
    };
    let now = admin.clock().unix_secs();
    let ids: Vec<&TenantId> = records.iter().map(|(r, _)| &r.id).collect();
    let refused = refusals_today(admin, &ids, now).await;
    for (record, why) in records {
        if view.plan.as_deref().is_some_and(|p| p != record.plan.as_str()) {
            continue;
        }
        let plan = plan_of(admin.config(), &record);
        let counters = match plan {
            Some(_) => counters_of(admin, record.id.as_str()).await?,
            None => Vec::new(),
        };
        // Each prepaid balance as its gauge reads it (never granted: 0 left of 0).
        let (state, balances) = match &plan {
            None => ("unknown plan", Vec::new()),
            Some(plan) => {
                let gauges = gauges(plan, &counters, None, now);
                let balances = gauges
                    .iter()
                    .filter(|g| g.period == Period::Prepaid)
                    .map(|g| (g.meter.clone(), g.limit.saturating_sub(g.used), g.limit))
                    .collect::<Vec<_>>();
                let state = if gauges.iter().any(|g| g.period == Period::Prepaid && g.reached()) {
                    "balance empty"
                } else if gauges.iter().any(|g| g.period != Period::Prepaid && g.mode == QuotaMode::Hard && g.reached())
                {
                    "quota reached"
                } else {
                    "active"
                };
                (state, balances)
            }
        };
        if view.state.is_some_and(|s| s != state) {
            continue;
        }
        let refusals = refused.as_ref().map(|r| r.get(&record.id).copied().unwrap_or(0));
        data.rows.push(TenantRow { record, why, balances, state, refusals });
    }
    sort_rows(&mut data.rows, view.sort);
    if let Some((_, matched)) = &mut data.window {
        // Every match of the window is shown (at most WINDOW rows): the next page reads on
        // past the window, so none is skipped.
        *matched = data.rows.len();
    }
    data.view = view;
    Ok(data)
}

/// The fleet's refusals today of `tenants` (the list's rows), from the tenants' tallies of
/// the day: a page's rows (at most [`PAGE`]) one read each, eight at a time; more (a window)
/// one read of every tenant's, bounded, and past its bound one read per row.
async fn refusals_today(
    admin: &Admin,
    tenants: &[&TenantId],
    now: i64,
) -> Option<std::collections::HashMap<TenantId, u64>> {
    if tenants.len() <= PAGE {
        return refusals_one_by_one(admin, tenants, now).await;
    }
    use crate::store::{TallyQuery, TallyRead, TallyScope};
    let day = now - now.rem_euclid(86_400);
    let read = |tallies: Vec<crate::store::Tally>| -> std::collections::HashMap<TenantId, u64> {
        tallies
            .iter()
            .filter_map(|t| match &t.scope {
                TallyScope::Tenant(id) => Some((id.clone(), refused_of(t))),
                TallyScope::Fleet => None,
            })
            .collect()
    };
    let all = match admin.tallies(&TallyQuery::new(TallyRead::Tenants, day, day + 86_400)).await {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: the tenants' tallies could not be read");
            return None;
        }
    };
    if all.len() < crate::store::contract::TALLY_READ_MAX {
        return Some(read(all));
    }
    refusals_one_by_one(admin, tenants, now).await
}

/// [`refusals_today`] one tenant's tally at a time, eight read at once.
async fn refusals_one_by_one(
    admin: &Admin,
    tenants: &[&TenantId],
    now: i64,
) -> Option<std::collections::HashMap<TenantId, u64>> {
    let mut out = std::collections::HashMap::new();
    for chunk in tenants.chunks(8) {
        let mut reads = Vec::with_capacity(chunk.len());
        for id in chunk {
            reads.push(admin.tenant_tally(id.as_str(), now));
        }
        for (id, read) in chunk.iter().zip(futures_util::future::join_all(reads).await) {
            match read {
                Ok(t) => {
                    out.insert((*id).clone(), t.as_ref().map_or(0, refused_of));
                }
                Err(e) => {
                    tracing::warn!(tenant = %id, error = %e, "dashboard: a tenant's tally could not be read");
                    return None;
                }
            }
        }
    }
    Some(out)
}

/// Orders the rows of the list (a stable sort: ties stay in id order).
fn sort_rows(rows: &mut [TenantRow], sort: Sort) {
    let least_left = |r: &TenantRow| r.balances.iter().map(|(_, left, _)| *left).min().unwrap_or(u64::MAX);
    let rank = |r: &TenantRow| STATES.iter().position(|s| *s == r.state).unwrap_or(STATES.len());
    rows.sort_by(|a, b| a.record.id.as_str().cmp(b.record.id.as_str()));
    match sort {
        Sort::Id => {}
        Sort::Plan => rows.sort_by(|a, b| a.record.plan.as_str().cmp(b.record.plan.as_str())),
        Sort::Balance => rows.sort_by_key(least_left),
        Sort::Refusals => rows.sort_by_key(|r| std::cmp::Reverse(r.refusals.unwrap_or(0))),
        Sort::State => rows.sort_by_key(rank),
    }
}

/// The tenants a filtered or sorted page reads: at most `size` of the directory after
/// `after` in id order, with the file's tenants the directory lacks among them, and where the
/// next window starts when tenants were left unread.
async fn window(
    admin: &Admin,
    after: Option<&str>,
    size: usize,
) -> Result<(Vec<(TenantRecord, Option<String>)>, Option<TenantId>), AdminError> {
    let mut records: Vec<(TenantRecord, Option<String>)> = Vec::new();
    let mut cursor = after.map(str::to_owned);
    let mut full = false;
    while records.len() < size {
        let want = (size - records.len()).min(ROWS);
        let page = admin.list_tenants(cursor.as_deref(), want).await?;
        let got = page.len();
        cursor = page.last().map(|t| t.id.to_string()).or(cursor);
        records.extend(page.into_iter().map(|t| (t, None)));
        if got < want {
            break;
        }
        full = records.len() == size;
    }
    // The file's tenants within the ids read (all of those after `after` when the directory
    // had no more): the directory's record of an id read is among the records already.
    let end = full.then(|| cursor.clone()).flatten();
    if let Some(config) = admin.config() {
        let held: std::collections::HashSet<TenantId> = records.iter().map(|(t, _)| t.id.clone()).collect();
        for spec in config.tenants() {
            let id = spec.id().as_str();
            if after.is_some_and(|a| id <= a) || end.as_deref().is_some_and(|e| id > e) || held.contains(spec.id()) {
                continue;
            }
            if let Some(record) = file_tenant(Some(config), id) {
                records.push((record, Some("declared in the configuration file".to_owned())));
            }
        }
    }
    records.sort_by(|a, b| a.0.id.as_str().cmp(b.0.id.as_str()));
    let mut next = end.map(TenantId::from);
    if records.len() > size {
        records.truncate(size);
        next = records.last().map(|(t, _)| t.id.clone());
    }
    Ok((records, next))
}

/// The usage window in seconds (an hour without a configuration).
fn window_of(config: Option<&Config>) -> i64 {
    config.map_or(3600, |c| i64::try_from(c.usage().window.as_secs()).unwrap_or(i64::MAX).max(1))
}

/// The hours of the hourly chart (at most [`HOURS`], at least 1) and the days of the daily
/// chart (at most [`DAYS`]; 0: none) that keep the usage rows a tenant's page reads, one per
/// window and meter, under about [`MAX_ROWS`].
pub(crate) fn chart_spans(config: Option<&Config>) -> (i64, i64) {
    let window = window_of(config);
    let meters = config.map_or(1, usage_rows_per_window).max(1);
    let span = MAX_ROWS.saturating_mul(window) / meters;
    ((span / 3600).clamp(1, HOURS), (span / 86_400).min(DAYS))
}

/// The most usage rows a tenant has per window: one per meter, and per series of an open
/// dimension's values not listed (`tokens{model=*,kind=output}`) one per value a tenant may use
/// in a month (`max_values`), twice, as the days read may cross two months.
fn usage_rows_per_window(config: &Config) -> i64 {
    let open_max = |parent: &MeterId| {
        config.meters().iter().find(|m| m.id() == parent).and_then(|m| m.dimensions()).and_then(|d| d.open())
    };
    let rows = config.meters().iter().fold(0u64, |sum, m| {
        let open =
            m.series_of().and_then(open_max).filter(|_| m.values().any(|(_, v)| v == crate::config::OPEN_POSITION));
        sum.saturating_add(open.map_or(1, |(_, max)| 2 * u64::from(max)))
    });
    i64::try_from(rows).unwrap_or(i64::MAX)
}

/// A tenant's quota counters; none when the administration has no quota store (an `Admin`
/// built without one): the page shows its quotas empty rather than failing.
async fn counters_of(admin: &Admin, id: &str) -> Result<Vec<QuotaCounter>, AdminError> {
    match admin.quota_counters(id).await {
        Err(AdminError::Invalid(_)) => Ok(Vec::new()),
        other => other,
    }
}

/// Sums `rows` into windows of `width` seconds: the `n` windows ending with the one holding
/// `now`, for each meter with usage in them (in meter order).
pub(crate) fn buckets(rows: &[UsageAggregate], now: i64, width: i64, n: i64) -> Vec<(MeterId, Vec<(i64, u64)>)> {
    let last = now - now.rem_euclid(width);
    let first = last - (n - 1) * width;
    let mut meters: Vec<(MeterId, Vec<(i64, u64)>)> = Vec::new();
    for a in rows.iter().filter(|a| a.key.window_start >= first && a.key.window_start < last + width) {
        let i = match meters.iter().position(|(m, _)| *m == a.key.meter) {
            Some(i) => i,
            None => {
                meters.push((a.key.meter.clone(), (0..n).map(|k| (first + k * width, 0)).collect()));
                meters.len() - 1
            }
        };
        let slot = ((a.key.window_start - first) / width) as usize;
        meters[i].1[slot].1 = add(meters[i].1[slot].1, a.quantity);
    }
    meters.sort_by(|a, b| a.0.cmp(&b.0));
    meters
}

/// One tenant's page (`None`: no such tenant).
pub(crate) async fn tenant(
    admin: &Admin,
    engine: Option<&Tollgate>,
    id: &str,
) -> Result<Option<TenantData>, AdminError> {
    if !TenantId::is_valid(id) {
        return Ok(None);
    }
    let Some(record) = (match admin.tenant(id).await? {
        Some(record) => Some(record),
        None => file_tenant(admin.config(), id),
    }) else {
        return Ok(None);
    };
    let now = admin.clock().unix_secs();
    let plan = plan_of(admin.config(), &record);
    let keys = match admin.keys(id).await {
        Ok(keys) => keys,
        // A tenant of the file only: its keys are the file's, never shown.
        Err(AdminError::UnknownTenant(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    let (mut gauges_, mut grants, mut cap, mut recharges) = (Vec::new(), Vec::new(), None, Vec::new());
    let mut grants_total = 0;
    if let Some(plan) = &plan {
        let counters = counters_of(admin, id).await?;
        if plan.spend().is_some() {
            cap = Some(admin.spend_cap(id).await?);
        }
        gauges_ = gauges(plan, &counters, cap.as_ref(), now);
        if plan.quotas().values().any(|q| q.period() == Period::Prepaid) {
            grants = admin.credits(id).await?.0;
            grants_total = grants.len();
            grants.sort_by_key(|g| g.closed.is_some());
            grants.truncate(ROWS);
        }
        for meter in plan.quotas().keys() {
            if plan.recharge(meter).is_some() {
                recharges.push(admin.recharge(id, meter.as_str()).await?);
            }
        }
    }
    // A usage row per window and meter: the time read keeps the rows under about MAX_ROWS
    // (30 days with an hourly window; hours only with a window of seconds).
    let (hours, days) = chart_spans(admin.config());
    let window = window_of(admin.config());
    let hour = now - now.rem_euclid(3600);
    let day = now - now.rem_euclid(86_400);
    let from = match days {
        0 => hour - (hours - 1) * 3600,
        _ => (hour - (hours - 1) * 3600).min(day - (days - 1) * 86_400),
    };
    // Spend is money, shown on its gauge and the spend cap's line: not charted as units.
    let mut rows = admin.usage(id, None, from, now + 1).await?;
    rows.retain(|a| a.key.meter.as_str() != crate::base::SPEND_METER);
    // A meter with dimensions is charted as its total, its series broken down apart.
    let (rows, breakdowns) = by_series(admin.config(), &rows, now, from);
    // Its tier, or none shown when its payments cannot be read (the page is still of use).
    let tier = admin.tier(id).await.unwrap_or_else(|e| {
        tracing::warn!(tenant = %record.id, error = %e, "dashboard: a tenant's tier could not be read");
        None
    });
    let past_due = admin.past_due(id).await.unwrap_or_default();
    // Its quotas as its usage route reads them on this node, for a tenant the node holds:
    // its counters per quota, its usage in their periods (a month's windows for a monthly
    // quota), its grants and recharges, as the route's own read.
    let route = match (engine, plan.is_some()) {
        (Some(engine), true) => Some(match engine.resident_report(&record.id, now).await {
            None => RouteView::NotHeld,
            Some(Ok(report)) => RouteView::Read(
                report.quotas.into_iter().filter(|q| q.meter.as_str() != crate::base::SPEND_METER).collect(),
            ),
            Some(Err(e)) => {
                tracing::warn!(tenant = %record.id, error = %e, "dashboard: a tenant's usage view could not be read");
                RouteView::Failed
            }
        }),
        _ => None,
    };
    Ok(Some(TenantData {
        past_due,
        plan_known: plan.is_some(),
        keys,
        gauges: gauges_,
        grants,
        grants_total,
        currency: admin.config().and_then(|c| c.billing().currency.clone()),
        cap,
        recharges,
        tier,
        // A window longer than an hour has no hourly figures.
        hourly: if window <= 3600 { buckets(&rows, now, 3600, hours) } else { Vec::new() },
        daily: if days > 0 { buckets(&rows, now, 86_400, days) } else { Vec::new() },
        rejections: engine.map(|e| e.recent_rejections(&record.id)),
        today: admin.tenant_tally(id, now).await.map_err(|e| e.to_string()),
        route,
        breakdowns,
        changes: admin.audit(Some(id), None, TENANT_CHANGES).await.map_err(|e| e.to_string()),
        record,
    }))
}

/// The billing page.
pub(crate) async fn billing(admin: &Admin) -> Result<BillingData, AdminError> {
    let now = admin.clock().unix_secs();
    let sink = match admin.config().and_then(|c| c.export().sink_kind(c.stripe().is_some())) {
        Some(kind) => format!("{kind:?}").to_lowercase(),
        None => "none (usage is recorded, not exported)".to_owned(),
    };
    let (lacking, lacking_cut) = admin.lacking(now, LEDGER_HOURS, ROWS + 1).await?;
    Ok(BillingData {
        lacking,
        lacking_cut,
        sink,
        pending: admin.pending_exports(now + 1, ROWS + 1).await?,
        dead: admin.dead_letters(None, ROWS + 1).await?,
    })
}

/// The alerts page (empty without an alerts store).
pub(crate) async fn alerts(admin: &Admin) -> Result<AlertsData, AdminError> {
    let mut found = Vec::new();
    for state in [AlertState::Pending, AlertState::Delivered, AlertState::Dead] {
        match admin.alerts(&AlertQuery::new(ROWS + 1).state(state)).await {
            Ok(rows) => found.push(rows),
            // No alerts store: nothing to show.
            Err(AdminError::Invalid(_)) => return Ok(AlertsData::default()),
            Err(e) => return Err(e),
        }
    }
    let mut found = found.into_iter();
    Ok(AlertsData {
        pending: found.next().unwrap_or_default(),
        delivered: found.next().unwrap_or_default(),
        dead: found.next().unwrap_or_default(),
    })
}

/// The outcomes the overview draws, in its order: requests admitted, then refusals grouped
/// as an operator reads them.
pub(crate) const OUTCOMES: [&str; 9] =
    ["admitted", "rate", "quota", "balance", "spend", "concurrency", "feature", "unknown key", "other"];

/// The overview's group of a tally's outcome ([`OUTCOMES`]); `None` for money spent.
pub(crate) fn outcome_group(outcome: &str) -> Option<&'static str> {
    let kind = RejectionKind::ALL.into_iter().find(|k| k.label() == outcome);
    Some(match (outcome, kind) {
        (crate::store::TALLY_ADMITTED, _) => "admitted",
        (crate::store::TALLY_SPENT | crate::store::TALLY_PAID, _) => return None,
        (_, Some(RejectionKind::RateLimited)) => "rate",
        (_, Some(RejectionKind::QuotaExceeded | RejectionKind::UnitsHeld | RejectionKind::HoldExceedsLimit)) => "quota",
        (_, Some(RejectionKind::CreditsExhausted)) => "balance",
        (_, Some(RejectionKind::SpendCapReached)) => "spend",
        (_, Some(RejectionKind::ConcurrencyLimited | RejectionKind::TenantBusy)) => "concurrency",
        (_, Some(RejectionKind::FeatureNotInPlan)) => "feature",
        (
            _,
            Some(
                RejectionKind::UnknownCredentials
                | RejectionKind::MissingCredentials
                | RejectionKind::MalformedCredentials,
            ),
        ) => "unknown key",
        _ => "other",
    })
}

/// The requests a tally counts refused, every reason.
pub(crate) fn refused_of(t: &crate::store::Tally) -> u64 {
    t.counts
        .iter()
        .filter(|(o, _)| !matches!(outcome_group(o), Some("admitted") | None))
        .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
}

/// How many tenants each of the overview's top lists shows.
pub(crate) const TOP: usize = 10;

/// A tenant of the overview's top lists: its requests admitted and refused today, its
/// refusals' commonest group, and its money spent today.
#[derive(Debug, Clone)]
pub(crate) struct TopTenant {
    pub(crate) tenant: TenantId,
    pub(crate) admitted: u64,
    pub(crate) refused: u64,
    pub(crate) reason: Option<&'static str>,
    pub(crate) spent: u64,
}

/// The overview: the fleet's requests admitted and refused per minute over the last hour and
/// per hour over the last day (every node's tallies), the top tenants today, money spent, the
/// alerts and dead letters waiting, and each role's store health.
#[derive(Debug, Clone, Default)]
pub(crate) struct OverviewData {
    /// Per group of [`OUTCOMES`] with any count in the day: its bars per minute of the last
    /// hour and per hour of the last day, and its totals over each.
    pub(crate) series: Vec<OutcomeSeries>,
    /// Money spent (nano-units of the currency) in the last hour and the last day.
    pub(crate) spent: (u64, u64),
    /// Money spent today (since midnight UTC; nano-units of the currency), and paid today
    /// (its smallest unit, before refunds and disputes), the fleet's.
    pub(crate) spent_today: u64,
    pub(crate) paid_today: u64,
    /// The tallies could not be read: why.
    pub(crate) unread: Option<String>,
    /// Today's top tenants (since midnight UTC) by requests admitted and by requests refused.
    pub(crate) top_used: Vec<TopTenant>,
    pub(crate) top_refused: Vec<TopTenant>,
    /// Tenants' tallies read today, and whether the read stopped at its bound (the top lists
    /// are then of those read).
    pub(crate) tenants_read: usize,
    pub(crate) tenants_cut: bool,
    pub(crate) currency: Option<String>,
    /// Alerts waiting for delivery and dead (at most [`ROWS`] counted: `ROWS + 1` says more),
    /// `None` without an alerts store.
    pub(crate) alerts: Option<Result<(usize, usize), String>>,
    /// Usage exports dead-lettered (at most `ROWS + 1` counted), `None` before it is read.
    pub(crate) dead_letters: Option<Result<usize, String>>,
    /// Each role's store: how long a read took, or why it failed.
    pub(crate) health: Vec<(&'static str, Result<Duration, String>)>,
}

/// One group of outcomes over the overview's two spans.
#[derive(Debug, Clone)]
pub(crate) struct OutcomeSeries {
    pub(crate) group: &'static str,
    /// (minute's start, requests), the last 60 minutes, the current one last.
    pub(crate) minutes: Vec<(i64, u64)>,
    /// (hour's start, requests), the last 24 hours, the current one last.
    pub(crate) hours: Vec<(i64, u64)>,
}

impl OutcomeSeries {
    /// Its total over the last hour and over the last day.
    pub(crate) fn totals(&self) -> (u64, u64) {
        let sum = |bars: &[(i64, u64)]| bars.iter().fold(0u64, |s, b| s.saturating_add(b.1));
        (sum(&self.minutes), sum(&self.hours))
    }
}

/// The overview's figures: two reads of the tallies (the fleet's minutes of the last day, at
/// most 1,440; the tenants' of today, at most
/// [`TALLY_READ_MAX`](crate::store::contract::TALLY_READ_MAX)), the alerts and dead letters
/// counted up to [`ROWS`], and one read of each role's store timed.
pub(crate) async fn overview(admin: &Admin) -> OverviewData {
    use crate::store::{TallyQuery, TallyRead, TallyScope, TALLY_SPENT};
    let now = admin.clock().unix_secs();
    let minute = now - now.rem_euclid(60);
    let hour = now - now.rem_euclid(3600);
    let (first_minute, first_hour) = (minute - 59 * 60, hour - 23 * 3600);
    let mut data =
        OverviewData { currency: admin.config().and_then(|c| c.billing().currency.clone()), ..OverviewData::default() };
    match admin.tallies(&TallyQuery::new(TallyRead::Fleet, first_hour, minute + 60)).await {
        Ok(fleet) => {
            let mut series: Vec<OutcomeSeries> = Vec::new();
            for t in fleet.iter().filter(|t| t.scope == TallyScope::Fleet) {
                let (m, h) = (((t.start - first_minute) / 60) as usize, ((t.start - first_hour) / 3600) as usize);
                let today = t.start >= now - now.rem_euclid(86_400);
                for (outcome, n) in &t.counts {
                    if outcome == crate::store::TALLY_PAID {
                        if today {
                            data.paid_today = data.paid_today.saturating_add(*n);
                        }
                        continue;
                    }
                    if outcome == TALLY_SPENT {
                        if today {
                            data.spent_today = data.spent_today.saturating_add(*n);
                        }
                        data.spent.1 = data.spent.1.saturating_add(*n);
                        if t.start >= first_minute {
                            data.spent.0 = data.spent.0.saturating_add(*n);
                        }
                        continue;
                    }
                    let Some(group) = outcome_group(outcome) else { continue };
                    let s = match series.iter_mut().position(|s| s.group == group) {
                        Some(i) => &mut series[i],
                        None => {
                            series.push(OutcomeSeries {
                                group,
                                minutes: (0..60).map(|i| (first_minute + i * 60, 0)).collect(),
                                hours: (0..24).map(|i| (first_hour + i * 3600, 0)).collect(),
                            });
                            series.last_mut().expect("pushed")
                        }
                    };
                    if let Some(bar) = s.hours.get_mut(h) {
                        bar.1 = bar.1.saturating_add(*n);
                    }
                    if t.start >= first_minute {
                        if let Some(bar) = s.minutes.get_mut(m) {
                            bar.1 = bar.1.saturating_add(*n);
                        }
                    }
                }
            }
            // Admitted always drawn, then the refusals in the order of OUTCOMES.
            if !series.iter().any(|s| s.group == "admitted") {
                series.push(OutcomeSeries {
                    group: "admitted",
                    minutes: (0..60).map(|i| (first_minute + i * 60, 0)).collect(),
                    hours: (0..24).map(|i| (first_hour + i * 3600, 0)).collect(),
                });
            }
            series.sort_by_key(|s| OUTCOMES.iter().position(|o| *o == s.group));
            data.series = series;
        }
        Err(e) => data.unread = Some(e.to_string()),
    }
    let day = now - now.rem_euclid(86_400);
    match admin.tallies(&TallyQuery::new(TallyRead::Tenants, day, day + 86_400)).await {
        Ok(tenants) => {
            data.tenants_read = tenants.len();
            data.tenants_cut = tenants.len() >= crate::store::contract::TALLY_READ_MAX;
            let mut top: Vec<TopTenant> = tenants
                .into_iter()
                .filter_map(|t| {
                    let TallyScope::Tenant(tenant) = &t.scope else { return None };
                    let mut groups: Vec<(&'static str, u64)> = Vec::new();
                    for (o, n) in &t.counts {
                        match outcome_group(o) {
                            Some("admitted") | None => {}
                            Some(g) => match groups.iter_mut().find(|(x, _)| *x == g) {
                                Some(e) => e.1 = e.1.saturating_add(*n),
                                None => groups.push((g, *n)),
                            },
                        }
                    }
                    let reason = groups.iter().max_by_key(|(_, n)| *n).map(|(g, _)| *g);
                    Some(TopTenant {
                        tenant: tenant.clone(),
                        admitted: t.count(crate::store::TALLY_ADMITTED),
                        refused: refused_of(&t),
                        reason,
                        spent: t.count(TALLY_SPENT),
                    })
                })
                .collect();
            top.sort_by(|a, b| b.admitted.cmp(&a.admitted).then_with(|| a.tenant.as_str().cmp(b.tenant.as_str())));
            data.top_used = top.iter().filter(|t| t.admitted > 0).take(TOP).cloned().collect();
            top.sort_by(|a, b| b.refused.cmp(&a.refused).then_with(|| a.tenant.as_str().cmp(b.tenant.as_str())));
            data.top_refused = top.into_iter().filter(|t| t.refused > 0).take(TOP).collect();
        }
        Err(e) => {
            data.unread.get_or_insert(e.to_string());
        }
    }
    let pending = admin.alerts(&AlertQuery::new(ROWS + 1).state(AlertState::Pending)).await.map(|r| r.len());
    let dead = admin.alerts(&AlertQuery::new(ROWS + 1).state(AlertState::Dead)).await.map(|r| r.len());
    data.alerts = match (pending, dead) {
        // No alerts store: nothing to count.
        (Err(AdminError::Invalid(_)), _) => None,
        (Ok(pending), Ok(dead)) => Some(Ok((pending, dead))),
        (Err(e), _) | (_, Err(e)) => Some(Err(e.to_string())),
    };
    data.dead_letters = Some(admin.dead_letters(None, ROWS + 1).await.map(|d| d.len()).map_err(|e| e.to_string()));
    data.health = health(admin).await;
    data
}

/// One read of each role's store, timed: the directory's, the usage's, the quota's.
async fn health(admin: &Admin) -> Vec<(&'static str, Result<Duration, String>)> {
    let probe = TenantId::from("tollgate-dashboard-probe");
    let mut health = Vec::new();
    let started = Instant::now();
    let directory = admin.tenant(probe.as_str()).await.map(|_| started.elapsed()).map_err(|e| e.to_string());
    health.push(("directory", directory));
    let started = Instant::now();
    let usage = admin.pending_exports(0, 1).await.map(|_| started.elapsed()).map_err(|e| e.to_string());
    health.push(("usage", usage));
    let started = Instant::now();
    let quota = admin.quota_counters(probe.as_str()).await.map(|_| started.elapsed()).map_err(|e| e.to_string());
    health.push(("quota", quota));
    health
}

/// The node's page: the engine's counters, and one read of each role's store timed.
pub(crate) async fn node(admin: &Admin, engine: &Tollgate) -> NodeData {
    let currency = admin.config().and_then(|c| c.billing().currency.clone());
    NodeData { stats: engine.stats(), health: health(admin).await, currency }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ExportKey, Kept, QuotaKey};

    fn aggregate(meter: &str, window: i64, quantity: u64) -> UsageAggregate {
        let mut a = UsageAggregate::new(ExportKey::new(TenantId::from("t"), MeterId::from(meter), window), quantity);
        a.quantity = quantity;
        a
    }

    /// A tenant the file declares is shown its file's plan, as the engine serves it, even when
    /// the directory holds a record of the same id on another plan; a directory tenant's
    /// overrides that do not fit are shown as the engine serves them (dropped).
    #[test]
    fn a_tenant_is_shown_the_plan_the_engine_serves() {
        let config = Config::from_toml_str(
            "[store]\nkind = \"memory\"\n[plans.free]\nrate = \"10/s\"\n[plans.pro]\nrate = \"100/s\"\n\
             [plans.norate]\n[tenants.f]\nplan = \"free\"\nkeys = [\"key-f\"]\n",
        )
        .unwrap();
        let other = TenantRecord::new("f".into(), "pro".into());
        assert_eq!(plan_of(Some(&config), &other).unwrap().id().as_str(), "free", "the file's first");
        let mut d = TenantRecord::new("d".into(), "norate".into());
        d.overrides = Some(r#"{"burst": 50}"#.into());
        let plan = plan_of(Some(&config), &d).unwrap();
        let norate = config.plan(&"norate".into()).unwrap();
        assert_eq!(
            (plan.id().as_str(), plan.burst()),
            ("norate", norate.burst()),
            "the burst that does not fit is dropped"
        );
    }

    #[test]
    fn usage_is_summed_into_hours_and_days_ending_now() {
        let now = 10 * 86_400 + 5 * 3600 + 1800;
        let rows = [
            aggregate("requests", now - 60, 3),
            aggregate("requests", now - 120, 4),
            aggregate("requests", now - 3600, 5),
            aggregate("tokens", now - 2 * 86_400, 7),
            aggregate("requests", now - 60 * 86_400, 100),
        ];
        let hours = buckets(&rows, now, 3600, HOURS);
        assert_eq!(hours.len(), 1, "tokens had nothing in the last 48 hours");
        let (meter, bars) = &hours[0];
        assert_eq!((meter.as_str(), bars.len()), ("requests", HOURS as usize));
        assert_eq!(bars.last().unwrap(), &(now - now % 3600, 7));
        assert_eq!(bars[bars.len() - 2].1, 5);
        let days = buckets(&rows, now, 86_400, DAYS);
        assert_eq!(
            days.iter().map(|(m, b)| (m.as_str(), b.iter().map(|x| x.1).sum::<u64>())).collect::<Vec<_>>(),
            [("requests", 12), ("tokens", 7)]
        );
    }

    #[test]
    fn the_charts_read_a_bounded_number_of_rows() {
        let with = |window: &str, meters: usize| {
            let mut text =
                format!("[store]\nkind = \"memory\"\n[usage]\nwindow = \"{window}\"\nflush_interval = \"1s\"\n[plans.p]\nrate = \"1/s\"\n");
            for m in 0..meters {
                text.push_str(&format!("[meters.m{m}]\n"));
            }
            Config::from_toml_str(&text).unwrap()
        };
        assert_eq!(chart_spans(Some(&with("1h", 0))), (HOURS, DAYS), "hourly windows: 48 hours, 30 days");
        assert_eq!(chart_spans(Some(&with("1m", 0))), (HOURS, 30), "50,000 minutes: 34 days");
        assert_eq!(chart_spans(Some(&with("1m", 9))), (HOURS, 3));
        assert_eq!(chart_spans(Some(&with("5s", 0))), (HOURS, 2), "250,000 seconds: 69 hours");
        assert_eq!(chart_spans(Some(&with("5s", 9))), (6, 0), "25,000 seconds: 6 hours, no daily chart");
        for (window, meters) in [("5s", 0), ("5s", 20), ("1m", 9), ("1m", 0), ("1h", 0)] {
            let config = with(window, meters);
            let (hours, days) = chart_spans(Some(&config));
            let w = config.usage().window.as_secs() as i64;
            let read = (hours * 3600).max(days * 86_400);
            let rows = read / w * (meters as i64 + 1);
            assert!(rows <= MAX_ROWS + 86_400 / w, "{window} × {meters}: {rows} rows");
        }
    }

    /// An open dimension's series not listed has a row per value a tenant uses (up to
    /// `max_values` a month, two months read): the charts read fewer days for it.
    #[test]
    fn an_open_dimension_counts_each_value_a_tenant_may_use() {
        let config = Config::from_toml_str(
            "[store]\nkind = \"memory\"\n[meters.tokens]\ndimensions = [\"model\"]\nmax_values.model = 100\n\
             [plans.p]\nrate = \"1/s\"\n",
        )
        .unwrap();
        // requests, tokens and tokens{model=*}: 1 + 1 + 2 × 100 rows a window.
        assert_eq!(usage_rows_per_window(&config), 202);
        assert_eq!(chart_spans(Some(&config)), (HOURS, 10), "50,000 / 202 hourly windows: 10 days");
    }

    /// Series are summed into their meter and broken down, the most used first, at most
    /// [`SERIES_SHOWN`] shown of how many there are; a row of no meter declared with dimensions
    /// (or named in another order) stays as it is.
    #[test]
    fn series_are_broken_down_the_most_used_first_within_a_bound() {
        let config = Config::from_toml_str(
            "[store]\nkind = \"memory\"\n[meters.tokens]\ndimensions = [\"model\"]\nmax_values.model = 1000\n\
             [plans.p]\nrate = \"1/s\"\n",
        )
        .unwrap();
        let now = 1_800_000_000; // an hour's start
        let mut rows: Vec<UsageAggregate> =
            (0..150).map(|i| aggregate(&format!("tokens{{model=v{i:03}}}"), now, i + 1)).collect();
        rows.push(aggregate("tokens{kind=x}", now, 9));
        rows.push(aggregate("other{model=v1}", now, 9));
        let (merged, breakdowns) = by_series(Some(&config), &rows, now, now - 3600);
        let [b] = breakdowns.as_slice() else { panic!("{breakdowns:?}") };
        assert_eq!((b.meter.as_str(), b.total, b.series.len()), ("tokens", 150, SERIES_SHOWN));
        assert_eq!(b.series[0], (vec!["v149".to_owned()], 150, 150), "the most used first");
        assert_eq!(b.series[99].2, 51, "the 100 most used");
        let total: u64 = merged.iter().filter(|a| a.key.meter.as_str() == "tokens").map(|a| a.quantity).sum();
        assert_eq!(total, (1..=150).sum::<u64>(), "every series summed into its meter");
        let kept: Vec<&str> = merged.iter().map(|a| a.key.meter.as_str()).filter(|m| m.contains('{')).collect();
        assert_eq!(kept, ["tokens{kind=x}", "other{model=v1}"], "rows of no declared series stay");
    }

    #[test]
    fn a_gauge_counts_used_units_not_those_only_kept() {
        let config = Config::from_toml_str(
            "[store]\nkind = \"memory\"\n[meters.credits]\n[plans.p]\nrate = \"10/s\"\n\
             quotas.requests = { limit = 100, period = \"day\" }\nquotas.credits = { period = \"prepaid\" }\n\
             [[routes]]\nmethod = \"POST\"\npath = \"/g\"\nmeter = \"credits\"\n",
        )
        .unwrap();
        let plan = config.plan(&"p".into()).unwrap();
        let now = 50 * 86_400 + 10;
        let t = TenantId::from("t");
        let day = QuotaKey::new(t.clone(), "requests".into(), Period::Day, 50 * 86_400, 51 * 86_400);
        let yesterday = QuotaKey::new(t.clone(), "requests".into(), Period::Day, 49 * 86_400, 50 * 86_400);
        let (a, b) = Period::Prepaid.bounds(now);
        let balance = QuotaKey::new(t, "credits".into(), Period::Prepaid, a, b);
        let counters = [
            QuotaCounter::new(yesterday, 90, None),
            QuotaCounter::new(day, 60, None).keeping(Kept { lease: 20, held: 10, jobs: 0 }),
            QuotaCounter::new(balance, 40, Some(50)).keeping(Kept { lease: 30, held: 0, jobs: 0 }),
        ];
        let g = gauges(plan, &counters, None, now);
        let credits = g.iter().find(|g| g.meter.as_str() == "credits").unwrap();
        assert_eq!((credits.limit, credits.used, credits.kept), (50, 10, 30));
        let requests = g.iter().find(|g| g.meter.as_str() == "requests").unwrap();
        assert_eq!((requests.limit, requests.used, requests.kept), (100, 30, 30), "today's counter, not yesterday's");
        assert!(!requests.reached());
    }
}
