//! The rate stage of admission: a request's cells of its tenant's GCRA bucket (or of its client
//! address's, for anonymous callers limited per address), taken on its `RateCharge` (given back
//! if it is refused later), the rate's headers, the 429, and shadow mode's count.

use std::{borrow::Cow, num::NonZeroU32, time::Duration};

use governor::clock::Clock as _;

use crate::engine::admit::{charge::RateCharge, gate::Gate};
use crate::{
    clock::Clock,
    config::HeaderStyle,
    plan::RouteCost,
    response::{HeaderState, Rejection, RejectionKind},
    tenant::Tenant,
};

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Gate {
    /// The rate check of a request: the cells it takes become its charge's (with its headers
    /// and its time, the clock reading of the check), put back unless it is admitted; or its
    /// 429.
    #[inline(always)]
    pub(super) fn check_rate(&self, charge: &mut RateCharge, route: &RouteCost) -> Result<(), Rejection> {
        let (state, headers) = charge.split();
        let (at, took) = self.rate_of(state, route, headers)?;
        if took {
            charge.took(route.client, route.cost, at);
        } else {
            charge.at = at;
        }
        Ok(())
    }

    /// [`check_rate`](Self::check_rate)'s check: the request's time, and whether it took cells
    /// of its bucket (those of a fleet lease were taken before); or its 429.
    #[inline(always)]
    fn rate_of(&self, state: &Tenant, route: &RouteCost, headers: &mut HeaderState) -> Result<(i64, bool), Rejection> {
        let (meter, cost) = (route.meter, route.cost);
        let plan = &state.plan;
        let mut took = false;
        let now = if let Some(policy) = &plan.rate {
            if crate::plan::is_fleet(route.client) {
                // Taken from the tenant's fleet lease already.
                return Ok((self.fleet_rate_of(state, headers), false));
            }
            let cells = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
            let checked = match &plan.clients {
                None => policy.limiter.check(&state.gcra, cells),
                Some(clients) => {
                    if route.client == 0 {
                        self.without_address();
                    }
                    clients.limiter.check(&route.client, cells)
                }
            };
            // The check read the clock: its reading is the request's time.
            let now = Clock::last_check_secs();
            state.touch(now);
            match checked {
                // Header values are only computed when headers are sent.
                Ok(Ok(None)) => took = true,
                Ok(Ok(Some(remaining))) => {
                    took = true;
                    let empty = policy.burst.get() - remaining.min(policy.burst.get());
                    // t: until the next cell (at most one cell's time; none when full); under
                    // "draft-compat", until the bucket is full.
                    let cells = if plan.header_style == HeaderStyle::DraftCompat { empty } else { empty.min(1) };
                    headers.set_rate(remaining, ceil_secs(policy.rate.interval() * cells));
                }
                Ok(Err(not_until)) if plan.shadow => {
                    let wait = not_until.wait_time_from(self.shared.clock().now());
                    let t = if plan.header_style == HeaderStyle::DraftCompat {
                        wait + Duration::from_nanos(policy.nanos(policy.burst.get().saturating_sub(cost)))
                    } else {
                        wait
                    };
                    headers.set_rate(0, ceil_secs(t).max(1));
                    self.would_refuse(&Self::shadow_rate(state));
                }
                Err(_) if plan.shadow => self.would_refuse(&Self::shadow_rate(state)),
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.shared.clock().now());
                    // Retry-After: until this request could pass; t: the same (the next cells
                    // it needs), so Retry-After is never earlier than t; under "draft-compat",
                    // t until the bucket is full again, as on a 200.
                    let retry = ceil_secs(wait).max(1);
                    let t = if plan.header_style == HeaderStyle::DraftCompat {
                        let full = wait + Duration::from_nanos(policy.nanos(policy.burst.get().saturating_sub(cost)));
                        ceil_secs(full).max(1)
                    } else {
                        retry
                    };
                    headers.set_rate(0, t);
                    Self::quota_headers(state, headers, meter, now);
                    let mut r = Rejection::new(
                        RejectionKind::RateLimited,
                        Cow::Owned(format!(
                            "the rate of plan `{}` ({}, burst {}) is spent",
                            plan.id, policy.rate, policy.burst
                        )),
                    );
                    r.inner.policy = Some("rate".to_owned());
                    r.inner.headers = *headers;
                    return Err(r.with_retry_after(retry).for_tenant(state));
                }
                Err(_) => {
                    // Every 429 says when to come back: here, never sooner than the bucket is
                    // full (a configuration keeps every route's cost within the burst, so this
                    // takes a plan compiled otherwise).
                    let full = ceil_secs(policy.rate.interval() * policy.burst.get()).max(1);
                    let r = Rejection::new(RejectionKind::RateLimited, "the request costs more than the plan's burst");
                    return Err(r.with_retry_after(full).for_tenant(state));
                }
            }
            now
        } else {
            let now = self.shared.clock().unix_secs();
            state.touch(now);
            now
        };
        Ok((now, took))
    }

    /// Counts an anonymous request without a client address: it shares one bucket with the
    /// others like it.
    #[cold]
    fn without_address(&self) {
        self.shared.totals().anonymous_without_address.add(1);
    }

    /// The refusal of a spent rate that shadow mode counts.
    #[cold]
    fn shadow_rate(state: &Tenant) -> Rejection {
        let mut r = Rejection::new(RejectionKind::RateLimited, "the rate is spent (shadow mode: not refused)");
        r.inner.policy = Some("rate".to_owned());
        r.for_tenant(state)
    }
}
