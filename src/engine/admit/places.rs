//! Admission under a fleet concurrency (`concurrency_scope = "fleet"`): a request takes one of
//! the places its node leased of its tenant's places ([`PlacesNode`]), and waits for a lease
//! of one more when none is free.
//!
//! [`PlacesNode`]: crate::engine::admit::place_node::PlacesNode

use std::{borrow::Cow, sync::Arc};

use crate::engine::admit::{
    charge::RateCharge,
    gate::Gate,
    place_node::Leased,
    stage::{ClaimPlace, Decision, KeyClaim, Partial},
};
use crate::{
    plan::{RouteCost, Runtime},
    response::{Rejection, RejectionKind},
    tenant::{Slot, Tenant},
};

/// What a request's lease of a place came to, as its plan answers it.
enum Placed {
    /// Its place (none: admitted without one, in shadow mode).
    Slot(Option<Box<Slot>>),
    /// Every place of the fleet taken: 429.
    Full,
    /// The store failed and the plan fails closed: 503.
    Refused(Rejection),
}

impl Gate {
    /// Leases a place for a request whose node holds none free (one store call for the
    /// tenant's waiting requests on this node, within `usage.store_timeout`), then decides the
    /// request on with it. None free in the fleet: 429 `Too many concurrent requests`; the store
    /// failing: the plan's `on_store_error` (fail-open, the default: the node counts alone for a
    /// second, its share of the limit; fail-closed: 503).
    pub(crate) async fn acquire_place(&self, p: Partial, route: RouteCost, rt: &Arc<Runtime>) -> Decision {
        let Partial { charge, claim, charged, .. } = p;
        match self.lease_place(charge.state(), rt).await {
            Placed::Slot(slot) => self.decide_placed(charge, route, charged, claim, slot),
            Placed::Full => {
                drop(claim);
                self.reject(Self::too_many_in_flight(charge, route.meter))
            }
            Placed::Refused(r) => self.reject(r),
        }
    }

    /// A first request with an `Idempotency-Key` on a fleet concurrency whose node holds no
    /// free place: its place is leased first ([`acquire_place`](Self::acquire_place)'s
    /// answers), then its key is claimed with the place held, so that a request refused for
    /// its place never writes its key.
    pub(crate) async fn place_then_claim(&self, mut c: KeyClaim, route: RouteCost, rt: &Arc<Runtime>) -> Decision {
        match self.lease_place(c.charge.state(), rt).await {
            Placed::Slot(slot) => {
                c.placed = ClaimPlace::Taken(slot);
                Box::pin(self.claim_in_store(c, route, rt)).await
            }
            Placed::Full => {
                let KeyClaim { charge, claim, .. } = c;
                drop(claim);
                self.reject(Self::too_many_in_flight(charge, route.meter))
            }
            Placed::Refused(r) => self.reject(r),
        }
    }

    /// A place for a request of `state`'s tenant, leased when the node holds none free: the
    /// slot (none in shadow mode past the limit), every place taken, or the store's failure
    /// answered as the plan says.
    async fn lease_place(&self, state: &Tenant, rt: &Arc<Runtime>) -> Placed {
        match self.places.lease(state, rt).await {
            Leased::Place(slot) => Placed::Slot(Some(slot)),
            Leased::NoneFree if self.shadowed(state, &Self::shadow_concurrency(state)) => Placed::Slot(None),
            Leased::NoneFree => Placed::Full,
            Leased::Refused(r) => Placed::Refused(r),
        }
    }
}

/// The concurrency stage's refusals, on a node's count or the fleet's places.
impl Gate {
    /// The tenant has its plan's `concurrency` requests in flight on this node: 429, to come
    /// back in a second; `RateLimit-Policy` names the limit (`qu="concurrent-requests"`).
    #[cold]
    pub(crate) fn too_many_in_flight(charge: RateCharge, meter: usize) -> Rejection {
        let at = charge.at;
        let (state, mut headers) = charge.refuse();
        let state = &state;
        Self::quota_headers(state, &mut headers, meter, at);
        headers.set_concurrency();
        let limit = state.plan.concurrency;
        let mut r = Rejection::new(
            RejectionKind::ConcurrencyLimited,
            Cow::Owned(format!(
                "{limit} requests of this tenant are in flight already: plan `{}` allows {limit} at once",
                state.plan.id
            )),
        );
        r.inner.policy = Some("concurrency".to_owned());
        r.inner.headers = headers;
        r.with_retry_after(1).for_tenant(state)
    }

    #[cold]
    pub(crate) fn shadow_concurrency(state: &Tenant) -> Rejection {
        let mut r =
            Rejection::new(RejectionKind::ConcurrencyLimited, "too many requests in flight (shadow mode: not refused)");
        r.inner.policy = Some("concurrency".to_owned());
        r.for_tenant(state)
    }
}
