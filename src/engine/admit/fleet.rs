//! Admission under a fleet rate (`rate_scope = "fleet"`): a request spends cells of its
//! tenant's lease of the shared bucket, with no store call while the lease lasts; an empty
//! lease is refilled by one store call for the tenant's waiting requests together.

use std::{borrow::Cow, sync::Arc};

use crate::engine::{engine::Stage, Admission, Tollgate};
use crate::{
    config::{HeaderStyle, StoreErrorPolicy},
    plan::{RouteCost, Runtime, FLEET_TAKEN},
    response::{HeaderState, Rejection, RejectionKind},
    store::{CellCall, ReserveToken},
    tenant::{FleetCells, Tenant},
};

/// How long a node serves a fail-open fleet rate from its own bucket once the rate role's
/// store failed, before it asks the store again.
const FALLBACK_NANOS: i64 = 1_000_000_000;

/// A request of a fleet rate waiting for its tenant's lease of cells, with what it carries to
/// be decided again once the lease came.
pub(crate) struct RateWait {
    pub(crate) state: Tenant,
    pub(crate) key: Option<(Box<[u8]>, u128)>,
}

fn ceil_secs_nanos(nanos: i128) -> u64 {
    u64::try_from((nanos.max(0) + 999_999_999) / 1_000_000_000).unwrap_or(u64::MAX)
}

impl Tollgate {
    /// Takes the request's cells from its tenant's fleet lease (the route then carries
    /// [`FLEET_TAKEN`]: its rate check reports them and its charge gives them back); `Some`
    /// when it must wait for a lease first. While the store is taken as down (fail-open), the
    /// plan's own bucket serves instead (the route is left as it is).
    #[cold]
    #[inline(never)]
    pub(crate) fn take_fleet_cells(
        &self,
        state: &Tenant,
        route: &mut RouteCost,
        key: Option<(&[u8], u128)>,
    ) -> Option<Admission> {
        let fleet = state.fleet()?;
        let now = self.shared.clock().unix_nanos();
        if fleet.in_fallback(now) {
            return None;
        }
        if fleet.take(route.cost, now).is_some() {
            route.client = FLEET_TAKEN;
            return None;
        }
        let key = key.map(|(k, request)| (Box::from(k), request));
        let wait = RateWait { state: state.clone(), key };
        Some(Admission::pending(Stage::Rate(Box::new(wait)), *route))
    }

    /// The rate check of a request whose cells came from its tenant's fleet lease: its time,
    /// and the headers from the lease and the shared bucket's last reading.
    #[cold]
    #[inline(never)]
    pub(crate) fn fleet_rate_of(&self, state: &Tenant, headers: &mut HeaderState) -> i64 {
        let now = self.shared.clock().unix_nanos();
        let at = now.div_euclid(1_000_000_000);
        state.touch(at);
        if let (Some(fleet), Some(rate)) = (state.fleet(), state.plan.fleet.as_ref()) {
            if state.plan.header_style != HeaderStyle::None {
                let (left, tat) = fleet.peek();
                let r = FleetCells::remaining(left, tat, now, rate.bucket);
                let empty = rate.bucket.burst.saturating_sub(r);
                let cells = if state.plan.header_style == HeaderStyle::DraftCompat { empty } else { empty.min(1) };
                headers.set_rate(r, ceil_secs_nanos(i128::from(cells) * i128::from(rate.bucket.interval)));
            }
        }
        at
    }

    /// Leases cells of the waiting request's tenant (one store call for the tenant's waiting
    /// requests on this node), then decides the request again: its cells are in the lease.
    /// Refused by the shared bucket, it is answered 429 with the time its cells come back; the
    /// store failing, the fleet rate's `on_store_error` decides (fail-open: the plan's own
    /// bucket, rate / N, serves for a second; fail-closed: 503).
    pub(crate) async fn lease_cells(&self, w: RateWait, mut route: RouteCost, rt: &Arc<Runtime>) -> Admission {
        let RateWait { state, key } = w;
        let (Some(fleet), Some(rate)) = (state.fleet(), state.plan.fleet.as_ref()) else {
            return self.decide(state.clone(), route, key.as_ref().map(|(k, r)| (&k[..], *r)));
        };
        let bucket = rate.bucket;
        let cost = route.cost;
        let one = fleet.lock().lock().await;
        let now = self.shared.clock().unix_nanos();
        let taken = if fleet.in_fallback(now) {
            false
        } else if fleet.take(cost, now).is_some() {
            // Another request's lease came meanwhile.
            true
        } else {
            let want = fleet.want(cost, now, bucket);
            let sender = fleet.sender(|| self.shared.ids().new_sender());
            let token = ReserveToken::new(sender, self.shared.ids().next_seq()).at(now.div_euclid(1_000_000_000));
            let call = CellCall::new(state.id.clone(), want, cost, bucket.interval, bucket.burst, now, token);
            match self.shared.stores().request().rate.take_cells(&call).await {
                Ok(grant) if grant.granted >= cost => {
                    fleet.leased(grant.granted, cost, grant.tat, now, bucket);
                    true
                }
                Ok(grant) => {
                    fleet.read(grant.tat);
                    let r = self.fleet_refusal(&state, route, grant.tat, now);
                    if !self.shadowed(&state, &r) {
                        return self.reject(r);
                    }
                    // Shadow mode: counted, served from the plan's own bucket.
                    fleet.fall_back(now.saturating_add(FALLBACK_NANOS));
                    false
                }
                Err(e) => {
                    tracing::debug!(tenant = %state.id, error = %e, "the rate store failed");
                    if rate.on_store_error == StoreErrorPolicy::FailClosed {
                        let r =
                            Rejection::new(RejectionKind::StoreUnavailable, "the rate store did not answer in time");
                        return self.reject(r.with_retry_after(1).for_tenant(&state));
                    }
                    fleet.fall_back(now.saturating_add(FALLBACK_NANOS));
                    false
                }
            }
        };
        drop(one);
        if taken {
            route.client = FLEET_TAKEN;
        }
        // Decided again under the configuration it was decided under.
        let _ = rt;
        self.decide(state, route, key.as_ref().map(|(k, r)| (&k[..], *r)))
    }

    /// The 429 of a request whose cells the shared bucket refused: `Retry-After` when the
    /// cells it costs come back (the bucket's TAT `tat`, at `now`).
    fn fleet_refusal(&self, state: &Tenant, route: RouteCost, tat: i64, now: i64) -> Rejection {
        let rate = state.plan.fleet.as_ref().expect("a fleet rate");
        let b = rate.bucket;
        let t = i128::from(b.interval);
        let wait = i128::from(tat.max(now)) + i128::from(route.cost) * t - i128::from(b.burst) * t - i128::from(now);
        let retry = ceil_secs_nanos(wait).max(1);
        let mut headers = HeaderState::new(route.meter, route.shape);
        let full = i128::from(tat.max(now)) - i128::from(now);
        let reset =
            if state.plan.header_style == HeaderStyle::DraftCompat { ceil_secs_nanos(full).max(1) } else { retry };
        headers.set_rate(0, reset);
        Self::quota_headers(state, &mut headers, route.meter, now.div_euclid(1_000_000_000));
        let mut r = Rejection::new(
            RejectionKind::RateLimited,
            Cow::Owned(format!(
                "the fleet rate of plan `{}` ({}, burst {}) is spent",
                state.plan.id, rate.rate, b.burst
            )),
        );
        r.inner.policy = Some("rate".to_owned());
        r.inner.headers = headers;
        r.with_retry_after(retry).for_tenant(state)
    }
}
