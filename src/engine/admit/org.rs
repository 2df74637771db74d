//! The organization's stage of admission: a tenant in an organization (`[tenants.X] org`)
//! passes the organization's quotas too. The organization's counters are a state of the tenant
//! table of their own (`OrgId::counters_id`), leased from the quota role's store as a tenant's
//! are, so that its limit holds across the fleet as a tenant's does; a request takes its
//! route's cost from the organization's lease as well as from its tenant's, and the units
//! taken at each scope go back at each scope when the request is refused or not billed.

use std::{borrow::Cow, sync::Arc};

use crate::engine::{
    admit::{gate::Gate, stage::Partial},
    usage::taken::{OrgTaken, Taken},
};
use crate::{
    config::StoreErrorPolicy,
    plan::{OrgLimits, RouteCost, Runtime},
    response::{Rejection, RejectionKind},
    store::StoreError,
    tenant::{Take, Tenant, TenantState},
};

impl Gate {
    /// The state of `org`'s counters: the one the configuration in force serves (a tenant's
    /// plan compiled before a reload may name the organization's old limits).
    pub(crate) fn org_state(&self, org: &Arc<OrgLimits>) -> Tenant {
        let rt = self.shared.runtime().load();
        // The meter indices a request carries are its plan's: another configuration's
        // organization (a reload that changed the meters) is not read with them.
        let org = rt
            .orgs
            .get(&org.id)
            .filter(|o| Arc::ptr_eq(&o.plan.meters, &org.plan.meters) || o.plan.meters.ids == org.plan.meters.ids)
            .unwrap_or(org);
        let state = self
            .table()
            .org(&org.counters, &org.plan, || TenantState::new(org.counters.clone(), org.plan.clone(), None));
        state.touch(state.clock().unix_secs());
        state
    }

    /// The organization's part of a request of `state` on `route` at `at`, without waiting:
    /// the route's cost taken from the organization's lease where the organization limits the
    /// route's meter, and each meter the route reports checked for a unit left. `Err`: the
    /// organization's state with the meter it cannot serve and why ([`Take::Exhausted`], or
    /// [`Take::NeedLease`]: only the store can tell).
    #[inline(never)]
    pub(crate) fn org_units(
        &self,
        state: &Tenant,
        route: &RouteCost,
        charged: bool,
        at: i64,
    ) -> Result<Option<Box<OrgTaken>>, (Tenant, usize, Take)> {
        let Some(org) = &state.plan.org else { return Ok(None) };
        let org_state = self.org_state(org);
        if !charged {
            // A replay takes nothing, at any scope.
            return Ok(Some(Box::new(OrgTaken { state: org_state, taken: Taken::none() })));
        }
        if let Err((m, why)) = Self::check_reports(&org_state, route.reports & org.meters, at) {
            if why == Take::Exhausted && state.plan.shadow {
                self.would_refuse(&Self::org_refusal(state, &org_state, m, at));
            } else {
                return Err((org_state, m, why));
            }
        }
        let taken = match org_state.quota(route.meter) {
            None => Taken::none(),
            Some(cell) => match cell.try_take(u64::from(route.cost), at) {
                Take::Taken { tag, left } => {
                    if cell.wants_prefetch(left) {
                        self.units.prefetcher().request(&org_state, route.meter, cell);
                    }
                    Taken::lease(&org_state, route.meter, u64::from(route.cost), tag, at)
                }
                Take::Exhausted if state.plan.shadow => {
                    self.would_refuse(&Self::org_refusal(state, &org_state, route.meter, at));
                    Taken::force(&org_state, route.meter, u64::from(route.cost), at)
                }
                why => return Err((org_state, route.meter, why)),
            },
        };
        Ok(Some(Box::new(OrgTaken { state: org_state, taken })))
    }

    /// [`org_units`](Self::org_units), asking the store with the organization's cells' locks
    /// held where its lease cannot tell (the route's cost taken straight from a new
    /// reservation, so that no other request takes it first); `on_store_error` (the
    /// organization's plan's) when it does not answer. Refused: the organization's 429, 429
    /// `Tenant busy` for its turn, or 503 (the request's rate cells go back, its key is
    /// released, what it took of its tenant's goes back).
    pub(crate) async fn org_units_with_store(
        &self,
        mut p: Partial,
        route: RouteCost,
        rt: &Arc<Runtime>,
    ) -> Result<Partial, Rejection> {
        let state = p.charge.state().clone();
        let Some(org) = state.plan.org.clone() else { return Ok(p) };
        let at = p.charge.at;
        let org_state = self.org_state(&org);
        if !p.charged {
            p.org = Some(Box::new(OrgTaken { state: org_state, taken: Taken::none() }));
            return Ok(p);
        }
        let leases = self.units.leases();
        // The meters the route reports: a unit left at the organization.
        let mut bits = route.reports & org.meters;
        while bits != 0 {
            let m = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(cell) = org_state.quota(m) else { continue };
            if cell.check_units(1, at).is_ok() {
                continue;
            }
            let checked = self.unit_left(rt, cell, at).await;
            match checked {
                Ok(Err(Take::Exhausted)) if state.plan.shadow => {
                    self.would_refuse(&Self::org_refusal(&state, &org_state, m, at));
                }
                Ok(Err(Take::Exhausted)) => return Err(self.count(Self::org_quota_exceeded(p, &org_state, m))),
                Ok(_) => {}
                Err(e) => {
                    if let Some(r) = self.org_store_failed(&state, &org_state, m, &e) {
                        drop(p);
                        return Err(r);
                    }
                }
            }
        }
        let taken = match org_state.quota(route.meter) {
            None => Taken::none(),
            Some(cell) => {
                let cost = u64::from(route.cost);
                let outcome = self
                    .shared
                    .stores()
                    .under_lock(cell.lock(), async {
                        leases.settle_inflight(cell).await?;
                        leases.take_locked(rt, cell, at, cost, 0, true, None).await
                    })
                    .await;
                match outcome {
                    Ok(Some(t)) => {
                        if cell.wants_prefetch(t.left) {
                            self.units.prefetcher().request(&org_state, route.meter, cell);
                        }
                        Taken::lease(&org_state, route.meter, cost, t.tag, t.start.map_or(at, |s| at.max(s)))
                    }
                    Ok(None) if state.plan.shadow => {
                        self.would_refuse(&Self::org_refusal(&state, &org_state, route.meter, at));
                        Taken::force(&org_state, route.meter, cost, at)
                    }
                    Ok(None) => return Err(self.count(Self::org_quota_exceeded(p, &org_state, route.meter))),
                    Err(e) => match self.org_store_failed(&state, &org_state, route.meter, &e) {
                        Some(r) => {
                            drop(p);
                            return Err(r);
                        }
                        // Failing open: admitted without the organization's lease, its units
                        // owed and charged to the period once the store answers.
                        None => Taken::force(&org_state, route.meter, cost, at),
                    },
                }
            }
        };
        p.org = Some(Box::new(OrgTaken { state: org_state, taken }));
        Ok(p)
    }

    /// What a request does when the store did not answer for the organization's quota on
    /// `meter` (`e`): `None`, served (its quota fails open); else its refusal, 429 `Tenant
    /// busy` for a turn that did not come, 503 for the store.
    #[cold]
    fn org_store_failed(&self, state: &Tenant, org_state: &Tenant, meter: usize, e: &StoreError) -> Option<Rejection> {
        match org_state.quota_policy(meter) {
            StoreErrorPolicy::FailOpen => None,
            StoreErrorPolicy::FailClosed if crate::engine::store_calls::busy(e) => {
                let mut r = Rejection::new(
                    RejectionKind::TenantBusy,
                    "the organization's other requests kept its quota busy (queued past usage.queue_timeout, or its \
                     rows written by other nodes until the call's deadline)",
                );
                r.inner.scope = Some("organization");
                Some(self.count(r.with_retry_after(1).for_tenant(state)))
            }
            StoreErrorPolicy::FailClosed => {
                let r = Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                Some(self.count(r.with_retry_after(1).for_tenant(state)))
            }
        }
    }

    /// The quota item of an admitted request's headers, lowered to what its organization has
    /// left of its route's meter when that is less than its tenant has: the tightest shown.
    #[cold]
    #[inline(never)]
    pub(crate) fn org_headers(org: &OrgTaken, headers: &mut crate::response::HeaderState, at: i64) {
        if org.state.plan.header_style == crate::config::HeaderStyle::None {
            return;
        }
        if let Some(cell) = org.state.quota(headers.meter()) {
            let (remaining, end) = cell.status_at(at).unwrap_or_else(|| (cell.limit(), cell.window(at).1));
            headers.tighten_quota(remaining, (end - at).max(0) as u64);
        }
    }

    /// The refusal of a request whose organization's quota on `meter` is spent: its rate cells
    /// go back, its key is released, and what it took of its tenant's goes back (the drops).
    #[cold]
    #[inline(never)]
    pub(crate) fn org_quota_exceeded(p: Partial, org_state: &Tenant, meter: usize) -> Rejection {
        let at = p.charge.at;
        let (state, mut headers) = p.refuse();
        let mut r = Self::org_refusal(&state, org_state, meter, at);
        let retry = r.inner.retry_after.unwrap_or(1);
        if meter == headers.meter() && state.quota(meter).is_some() {
            // The route's quota item: nothing left, as its tightest scope says.
            headers.set_quota(0, retry);
        }
        r.inner.headers = headers;
        r
    }

    /// The 429 of an organization's spent quota on `meter`, for a request of `state`.
    #[cold]
    fn org_refusal(state: &Tenant, org_state: &Tenant, meter: usize, at: i64) -> Rejection {
        let cell = org_state.quota(meter).expect("an organization's refusal names a meter it limits");
        let (_, end) = cell.window(at);
        let org = state.plan.org.as_ref().map_or("", |o| o.id.as_str());
        let mut r = Rejection::new(
            RejectionKind::QuotaExceeded,
            Cow::Owned(format!(
                "the {} quota of {} {} of organization `{org}` (plan `{}`), which its tenants share, is spent until \
                 the period ends",
                cell.spec.period().name(),
                cell.spec.limit(),
                cell.meter_id(),
                org_state.plan.id,
            )),
        );
        r.inner.policy =
            Some(format!("org-{}-{}", crate::base::policy_name(cell.meter_id().as_str()), cell.spec.period().name()));
        r.inner.scope = Some("organization");
        r.with_retry_after((end - at).max(1) as u64).for_tenant(state)
    }
}
