//! Rate-limit header fields, framework-neutral: each front door maps a [`Field`] to its own
//! header name type.

use crate::{config::HeaderStyle, plan::CompiledPlan, tenant::TenantState};

/// A response header field written by tollgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// `RateLimit-Policy` (draft-10): the policies that apply to the request.
    RateLimitPolicy,
    /// `RateLimit` (draft-10): the remaining units and reset time of each policy.
    RateLimit,
    /// `Retry-After`: seconds to wait before retrying (on 429 and 503).
    RetryAfter,
    /// `X-RateLimit-Limit` (legacy style): the limit of the most restrictive policy.
    XRateLimitLimit,
    /// `X-RateLimit-Remaining` (legacy style).
    XRateLimitRemaining,
    /// `X-RateLimit-Reset` (legacy style): seconds until the most restrictive policy resets.
    XRateLimitReset,
    /// `Tollgate-Past-Due`: the tenant's subscription is past due and it keeps its plan until
    /// the grace ends (`[stripe] past_due_grace`): `until="2026-12-06T12:00:00Z", plan="free"`,
    /// a structured-field dictionary (RFC 8941). On every response of the tenant, whatever the
    /// header style.
    PastDue,
}

impl Field {
    /// The lowercase header name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Field::RateLimitPolicy => "ratelimit-policy",
            Field::RateLimit => "ratelimit",
            Field::RetryAfter => "retry-after",
            Field::XRateLimitLimit => "x-ratelimit-limit",
            Field::XRateLimitRemaining => "x-ratelimit-remaining",
            Field::XRateLimitReset => "x-ratelimit-reset",
            Field::PastDue => "tollgate-past-due",
        }
    }
}

/// A header value as [`emit`] hands it over: a value built once (the policy of a plan), a
/// borrowed string, or a string built for this response (handed over without another copy).
pub(crate) enum Value<'a> {
    Prebuilt(&'a http::HeaderValue),
    Borrowed(&'a str),
    Owned(String),
}

impl Value<'_> {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Value::Prebuilt(v) => v.to_str().unwrap_or_default(),
            Value::Borrowed(s) => s,
            Value::Owned(s) => s,
        }
    }
}

/// The live state of one policy for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PolicyStatus {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset_secs: u64,
}

/// What the headers of one response report: the meter of the request, the rate and quota
/// state after its admission. Compact (24 bytes; the limits come from the plan), as it travels
/// in every ticket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HeaderState {
    quota_remaining: u64,
    rate_remaining: u32,
    rate_reset: u32,
    quota_reset: u32,
    meter: u16,
    /// Bit 0: the rate is reported; bit 1: the quota is.
    has: u8,
    /// The policy shape of the request's route (an index of the plan's policy headers).
    shape: u8,
}

const RATE: u8 = 1;
const QUOTA: u8 = 2;
/// A refusal for the tenant's requests in flight (`concurrency`).
const CONCURRENCY: u8 = 4;

fn secs32(secs: u64) -> u32 {
    u32::try_from(secs).unwrap_or(u32::MAX)
}

impl HeaderState {
    pub(crate) fn new(meter: usize, shape: u8) -> Self {
        Self { meter: meter as u16, shape, ..Self::default() }
    }

    /// The meter index of the request.
    #[inline]
    pub(crate) fn meter(&self) -> usize {
        usize::from(self.meter)
    }

    pub(crate) fn set_rate(&mut self, remaining: u32, reset_secs: u64) {
        self.rate_remaining = remaining;
        self.rate_reset = secs32(reset_secs);
        self.has |= RATE;
    }

    /// Reports `cells` given back to the bucket (a request refused for another reason).
    pub(crate) fn give_back(&mut self, cells: u32, burst: u32) {
        if self.has & RATE != 0 {
            self.rate_remaining = self.rate_remaining.saturating_add(cells).min(burst);
        }
    }

    /// Marks a refusal for the tenant's requests in flight: its policy and item are added.
    pub(crate) fn set_concurrency(&mut self) {
        self.has |= CONCURRENCY;
    }

    /// Lowers the quota item to `remaining` (reset in `reset_secs`) when it says more: the
    /// tightest of the tenant's quota and its organization's is shown.
    pub(crate) fn tighten_quota(&mut self, remaining: u64, reset_secs: u64) {
        if self.has & QUOTA != 0 && remaining < self.quota_remaining {
            self.set_quota(remaining, reset_secs);
        }
    }

    pub(crate) fn set_quota(&mut self, remaining: u64, reset_secs: u64) {
        // A structured field carries at most 15 digits (a balance, or a limit, past them).
        self.quota_remaining = remaining.min(crate::base::HEADER_INTEGER_MAX);
        self.quota_reset = secs32(reset_secs);
        self.has |= QUOTA;
    }

    pub(crate) fn rate(&self, plan: &CompiledPlan) -> Option<PolicyStatus> {
        let (q, _) = plan.rate_q_w().filter(|_| self.has & RATE != 0)?;
        Some(PolicyStatus {
            limit: q,
            remaining: u64::from(self.rate_remaining),
            reset_secs: u64::from(self.rate_reset),
        })
    }

    pub(crate) fn quota(&self, plan: &CompiledPlan) -> Option<PolicyStatus> {
        if self.has & QUOTA == 0 {
            return None;
        }
        let index = (*plan.quota_of.get(self.meter())?)?;
        Some(PolicyStatus {
            limit: plan.quotas[usize::from(index)].1.limit().get(),
            remaining: self.quota_remaining,
            reset_secs: u64::from(self.quota_reset),
        })
    }
}

/// Writes the header fields of a response through `put`; computed values come owned, so a
/// front door can turn them into header values without another copy.
pub(crate) fn emit(
    plan: &CompiledPlan,
    state: &HeaderState,
    retry_after: Option<u64>,
    tenant: Option<&TenantState>,
    put: &mut dyn FnMut(Field, Value<'_>),
) {
    if let Some(note) = tenant.and_then(TenantState::past_due) {
        put(Field::PastDue, Value::Borrowed(&note.header));
    }
    if state.has & CONCURRENCY != 0 {
        match plan.header_style {
            HeaderStyle::Draft | HeaderStyle::DraftCompat => {
                return emit_concurrency(plan, state, retry_after, tenant, put)
            }
            HeaderStyle::Legacy => {
                // The policy that refused: no place left, and no reset to announce.
                let mut num = itoa::Buffer::new();
                put(Field::XRateLimitLimit, Value::Borrowed(num.format(plan.concurrency)));
                put(Field::XRateLimitRemaining, Value::Borrowed("0"));
                if let Some(secs) = retry_after {
                    put(Field::RetryAfter, Value::Borrowed(num.format(secs)));
                }
                return;
            }
            HeaderStyle::None => {}
        }
    }
    emit_fields(plan, state, retry_after, tenant, put);
}

/// [`emit`] for a refusal for the tenant's requests in flight: the `concurrency` policy
/// (`qu="concurrent-requests"`, draft-10's unit for them) and its item join the others.
#[cold]
#[inline(never)]
fn emit_concurrency(
    plan: &CompiledPlan,
    state: &HeaderState,
    retry_after: Option<u64>,
    tenant: Option<&TenantState>,
    put: &mut dyn FnMut(Field, Value<'_>),
) {
    let policy = format!("\"concurrency\";q={};qu=\"concurrent-requests\"", plan.concurrency);
    let item = "\"concurrency\";r=0";
    let join = |before: &str, more: &str| if before.is_empty() { more.to_owned() } else { format!("{before}, {more}") };
    let (mut policy_put, mut item_put) = (false, false);
    emit_fields(plan, state, retry_after, tenant, &mut |field, value| match field {
        Field::RateLimitPolicy => {
            policy_put = true;
            put(field, Value::Owned(join(value.as_str(), &policy)));
        }
        Field::RateLimit => {
            item_put = true;
            put(field, Value::Owned(join(value.as_str(), item)));
        }
        _ => put(field, value),
    });
    if !policy_put {
        put(Field::RateLimitPolicy, Value::Owned(policy));
    }
    if !item_put {
        put(Field::RateLimit, Value::Borrowed(item));
    }
}

fn emit_fields(
    plan: &CompiledPlan,
    state: &HeaderState,
    retry_after: Option<u64>,
    tenant: Option<&TenantState>,
    put: &mut dyn FnMut(Field, Value<'_>),
) {
    let mut num = itoa::Buffer::new();
    let (rate, quota) = match plan.header_style {
        HeaderStyle::None => (None, None),
        _ => (state.rate(plan), state.quota(plan)),
    };
    // A tenant that set its own spend cap: its policy is left out (as a balance's is).
    let own_cap =
        plan.spend.is_some_and(|s| tenant.and_then(|t| t.quota(s)).is_some_and(|c| c.own_cap_in_force().is_some()));
    let mut without_own_cap;
    let put: &mut dyn FnMut(Field, Value<'_>) = if own_cap {
        without_own_cap = |field: Field, value: Value<'_>| match field {
            Field::RateLimitPolicy => {
                let value = crate::plan::without_spend(value.as_str());
                if !value.is_empty() {
                    put(field, Value::Owned(value));
                }
            }
            _ => put(field, value),
        };
        &mut without_own_cap
    } else {
        put
    };
    match plan.header_style {
        HeaderStyle::Draft | HeaderStyle::DraftCompat => {
            let months = plan.policy_months.get(usize::from(state.shape)).and_then(Option::as_ref);
            if let Some(crate::plan::MonthPolicy::One { meter, by_days }) = months {
                // The month in force: the tenant's quota cell knows its period (one not leased
                // yet: the calendar's).
                let days = tenant.map(|t| match t.quota(*meter).map(|c| c.period()) {
                    Some((start, end)) if end > start => (end - start) / 86_400,
                    _ => {
                        let (start, end) =
                            t.quota(*meter).map_or((0, 0), |c| c.spec.period().bounds(t.clock().unix_secs()));
                        (end - start) / 86_400
                    }
                });
                let i = days.filter(|d| (28..=31).contains(d)).map_or(2, |d| (d - 28) as usize);
                put(Field::RateLimitPolicy, Value::Prebuilt(&by_days[i]));
            } else if let Some(crate::plan::MonthPolicy::Many(months)) = months {
                // A month quota's window is the length of its current period.
                let now = tenant.map_or(0, |t| t.clock().unix_secs());
                let mut value = String::with_capacity(96);
                if let Some((q, w)) = plan.rate_q_w() {
                    value.push_str("\"rate\";q=");
                    value.push_str(num.format(q));
                    value.push_str(";w=");
                    value.push_str(num.format(w));
                }
                for &k in months.iter() {
                    let (m, spec) = &plan.quotas[k];
                    let w = match spec.period() {
                        crate::base::Period::Month { .. } if now > 0 => {
                            let (start, end) = spec.period().bounds(now);
                            (end - start).max(0) as u64
                        }
                        period => period.nominal_secs(),
                    };
                    crate::plan::policy_item(&mut value, plan.meters.ids[*m].as_str(), spec, w, plan.header_style);
                }
                put(Field::RateLimitPolicy, Value::Owned(value));
            } else if let Some(Some(policy)) = plan.policy_header.get(usize::from(state.shape)) {
                put(Field::RateLimitPolicy, Value::Prebuilt(policy));
            }
            if rate.is_some()
                || quota.is_some()
                || plan.shape_reports.get(usize::from(state.shape)).is_some_and(|r| *r != 0)
            {
                let mut value = String::with_capacity(64);
                if let Some(r) = &rate {
                    item(&mut value, "rate", "", r, false, &mut num);
                }
                if let (Some(q), Some((_, spec))) = (&quota, plan.quotas.iter().find(|(m, _)| *m == state.meter())) {
                    let prepaid = spec.period() == crate::base::Period::Prepaid;
                    item(
                        &mut value,
                        &plan.meters.policy_names[state.meter()],
                        spec.period().name(),
                        q,
                        prepaid,
                        &mut num,
                    );
                }
                // The hard quotas of the meters the route reports, read live from the tenant.
                let mut reported = plan.shape_reports.get(usize::from(state.shape)).copied().unwrap_or(0);
                while reported != 0 {
                    let m = reported.trailing_zeros() as usize;
                    reported &= reported - 1;
                    if let Some(cell) = tenant.and_then(|t| t.quota(m)) {
                        let now = tenant.map_or(0, |t| t.clock().unix_secs());
                        let (_, end) = cell.period();
                        let (remaining, _) = cell.estimate(cell.lease());
                        // A period over on this node (a minute's, often): the calendar's next,
                        // whole.
                        let (remaining, end) = match now < end {
                            true => (remaining, end),
                            false => (cell.limit(), cell.window(now).1),
                        };
                        // In the policy's unit (a large spend cap's: micro-units).
                        let status = PolicyStatus {
                            limit: cell.spec.in_header(cell.limit()),
                            remaining: cell.spec.in_header(remaining),
                            reset_secs: (end - now).max(0) as u64,
                        };
                        let name = cell.spec.period().name();
                        item(&mut value, &plan.meters.policy_names[m], name, &status, cell.prepaid(), &mut num);
                    }
                }
                put(Field::RateLimit, Value::Owned(value));
            }
        }
        HeaderStyle::Legacy => {
            let tightest = match (&rate, &quota) {
                (Some(r), Some(q)) => Some(if q.remaining < r.remaining { q } else { r }),
                (r, q) => r.as_ref().or(q.as_ref()),
            };
            if let Some(p) = tightest {
                // A prepaid balance: its limit is the tenant's grants, and it never resets.
                let balance = quota.as_ref().is_some_and(|q| std::ptr::eq(p, q))
                    && plan
                        .quotas
                        .iter()
                        .any(|(m, s)| *m == state.meter() && s.period() == crate::base::Period::Prepaid);
                let spec = plan.quotas.iter().find(|(m, _)| *m == state.meter()).map(|(_, s)| s);
                let limit = match tenant.and_then(|t| t.quota(state.meter())).filter(|_| balance) {
                    Some(cell) => cell.limit(),
                    // In its remaining's unit (a large spend cap's: micro-units).
                    None => match spec.filter(|_| quota.as_ref().is_some_and(|q| std::ptr::eq(p, q))) {
                        Some(spec) => spec.in_header(p.limit),
                        None => p.limit,
                    },
                };
                put(Field::XRateLimitLimit, Value::Borrowed(num.format(limit)));
                put(Field::XRateLimitRemaining, Value::Borrowed(num.format(p.remaining)));
                if !balance {
                    put(Field::XRateLimitReset, Value::Borrowed(num.format(p.reset_secs)));
                }
            }
        }
        HeaderStyle::None => {}
    }
    if let Some(secs) = retry_after {
        put(Field::RetryAfter, Value::Borrowed(num.format(secs)));
    }
}

/// Appends `"NAME[-PERIOD]";r=R;t=T` to a `RateLimit` list (without `t` for a prepaid
/// balance, which never resets).
fn item(out: &mut String, name: &str, period: &str, status: &PolicyStatus, prepaid: bool, num: &mut itoa::Buffer) {
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push('"');
    out.push_str(name);
    if !period.is_empty() {
        out.push('-');
        out.push_str(period);
    }
    out.push_str("\";r=");
    // At most 15 digits: `set_quota` and the reported meters' items bound it.
    out.push_str(num.format(status.remaining));
    if !prepaid {
        out.push_str(";t=");
        out.push_str(num.format(status.reset_secs));
    }
}
