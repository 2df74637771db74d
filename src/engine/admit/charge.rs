//! A request's rate charge: the cells its rate check took, put back when the charge is dropped
//! (a request refused for anything else, or abandoned while it waited on the store, spends
//! none), unless the request was admitted and they became its ticket's. Tokio's
//! `SemaphorePermit` shape: returned on drop, kept by [`RateCharge::keep`].

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
    /// The bucket's key among the client addresses (the anonymous tenant).
    client: u64,
    /// The cells to put back; 0 once put back or kept.
    cost: u32,
}

impl RateCharge {
    #[inline]
    pub(crate) fn new(state: Tenant, route: &RouteCost, headers: HeaderState, at: i64) -> Self {
        Self { state: Some(state), headers, at, client: route.client, cost: route.cost }
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
