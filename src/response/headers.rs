//! Rate-limit header fields, framework-neutral: each front door maps a [`Field`] to its own
//! header name type.

use std::borrow::Cow;

use crate::{config::HeaderStyle, plan::CompiledPlan};

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
}

impl Field {
    /// The lowercase header name.
    pub const fn name(self) -> &'static str {
        match self {
            Field::RateLimitPolicy => "ratelimit-policy",
            Field::RateLimit => "ratelimit",
            Field::RetryAfter => "retry-after",
            Field::XRateLimitLimit => "x-ratelimit-limit",
            Field::XRateLimitRemaining => "x-ratelimit-remaining",
            Field::XRateLimitReset => "x-ratelimit-reset",
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
/// state after its admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HeaderState {
    pub(crate) meter: usize,
    pub(crate) rate: Option<PolicyStatus>,
    pub(crate) quota: Option<PolicyStatus>,
}

/// Writes the header fields of a response through `put`; computed values come owned, so a
/// front door can turn them into header values without another copy.
pub(crate) fn emit(
    plan: &CompiledPlan,
    state: &HeaderState,
    retry_after: Option<u64>,
    put: &mut dyn FnMut(Field, Cow<'_, str>),
) {
    let mut num = itoa::Buffer::new();
    match plan.header_style {
        HeaderStyle::Draft => {
            if let Some(policy) = plan.policy_header.get(state.meter).filter(|p| !p.is_empty()) {
                put(Field::RateLimitPolicy, Cow::Borrowed(policy));
            }
            if state.rate.is_some() || state.quota.is_some() {
                let mut value = String::with_capacity(64);
                if let Some(r) = &state.rate {
                    item(&mut value, "rate", "", r, &mut num);
                }
                if let (Some(q), Some((_, spec))) = (&state.quota, plan.quotas.iter().find(|(m, _)| *m == state.meter))
                {
                    item(&mut value, plan.meters.ids[state.meter].as_str(), spec.period().name(), q, &mut num);
                }
                put(Field::RateLimit, Cow::Owned(value));
            }
        }
        HeaderStyle::Legacy => {
            let tightest = match (&state.rate, &state.quota) {
                (Some(r), Some(q)) => Some(if q.remaining < r.remaining { q } else { r }),
                (r, q) => r.as_ref().or(q.as_ref()),
            };
            if let Some(p) = tightest {
                put(Field::XRateLimitLimit, Cow::Borrowed(num.format(p.limit)));
                put(Field::XRateLimitRemaining, Cow::Borrowed(num.format(p.remaining)));
                put(Field::XRateLimitReset, Cow::Borrowed(num.format(p.reset_secs)));
            }
        }
        HeaderStyle::None => {}
    }
    if let Some(secs) = retry_after {
        put(Field::RetryAfter, Cow::Borrowed(num.format(secs)));
    }
}

/// Appends `"NAME[-PERIOD]";r=R;t=T` to a `RateLimit` list.
fn item(out: &mut String, name: &str, period: &str, status: &PolicyStatus, num: &mut itoa::Buffer) {
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
    out.push_str(num.format(status.remaining));
    out.push_str(";t=");
    out.push_str(num.format(status.reset_secs));
}
