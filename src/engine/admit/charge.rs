//! A request's rate charge: the cells its rate check took (or a fleet rate's lease gave it),
//! put back when the charge is dropped (a request refused for anything else, or abandoned
//! while it waited on the store, spends none), unless the request was admitted and they became
//! its ticket's. Tokio's `SemaphorePermit` shape: returned on drop, kept by
//! [`RateCharge::keep`]. A charge is made before the rate check, holding no cell: everything a
//! request takes of its rate from then on is the charge's.

use crate::{plan::RouteCost, response::HeaderState, tenant::Tenant};

/// The rate cells a request took from its bucket, with its tenant, the headers its check set
/// and the time of the check.
pub(crate) struct RateCharge {
    /// Taken out only as the charge is consumed ([`keep`](Self::keep), [`refuse`](Self::refuse)).
    state: Option<Tenant>,
    /// What the rate-limit headers report.
    pub(crate) headers: HeaderState,
    /// The request's time: the clock reading of its rate check.
    pub(crate) at: i64,
    /// The bucket the cells came from: the tenant's (0), a client address's key (the anonymous
    /// tenant), or the tenant's fleet lease ([`fleet_key`](crate::plan::fleet_key)).
    client: u64,
    /// The cells to put back; 0 when none were taken, or once put back or kept.
    cost: u32,
}

impl RateCharge {
    /// The charge of a request on `route`, before anything was taken of its rate.
    #[inline]
    pub(crate) fn new(state: Tenant, route: &RouteCost) -> Self {
        Self {
            state: Some(state),
            headers: HeaderState::new(route.meter, route.shape),
            at: 0,
            client: route.client,
            cost: 0,
        }
    }

    /// `cost` cells were taken from the bucket `client` at `at`: they are the charge's.
    #[inline]
    pub(crate) fn took(&mut self, client: u64, cost: u32, at: i64) {
        self.client = client;
        self.cost = cost;
        self.at = at;
    }

    /// The tenant.
    #[inline]
    pub(crate) fn state(&self) -> &Tenant {
        match &self.state {
            Some(state) => state,
            None => unreachable!("a charge's tenant is taken out only as the charge is consumed"),
        }
    }

    /// The tenant and the headers, the headers to be written.
    #[inline]
    pub(crate) fn split(&mut self) -> (&Tenant, &mut HeaderState) {
        match &self.state {
            Some(state) => (state, &mut self.headers),
            None => unreachable!("a charge's tenant is taken out only as the charge is consumed"),
        }
    }

    /// Admitted: the cells are the request's for good. Its tenant and headers.
    #[inline]
    pub(crate) fn keep(mut self) -> (Tenant, HeaderState) {
        self.cost = 0;
        match self.state.take() {
            Some(state) => (state, self.headers),
            None => unreachable!("a charge's tenant is taken out only as the charge is consumed"),
        }
    }

    /// Refused: the cells go back now, and the headers say so. Its tenant and headers, for
    /// the refusal.
    #[inline]
    pub(crate) fn refuse(mut self) -> (Tenant, HeaderState) {
        self.put_back();
        self.keep()
    }

    #[inline]
    fn put_back(&mut self) {
        if self.cost != 0 {
            self.put_back_cells();
        }
    }

    /// The cells go back (the request was refused, or dropped): off the admitted path.
    #[cold]
    #[inline(never)]
    fn put_back_cells(&mut self) {
        if let Some(state) = &self.state {
            if let Some((cells, burst)) = state.give_back_rate(self.client, self.cost) {
                self.headers.give_back(cells, burst);
            }
        }
        self.cost = 0;
    }
}

impl Drop for RateCharge {
    #[inline]
    fn drop(&mut self) {
        self.put_back();
    }
}
