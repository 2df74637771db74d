//! An admitted request, until its response is known.

use std::fmt;

use super::idempotency::Claim;
use crate::{
    config::{HeaderStyle, PlanId, TenantId},
    response::{emit, Field, HeaderState, Value},
    tenant::Tenant,
    usage::TenantContext,
};

/// The units were owed outside any lease (admitted fail-open before the cell held one).
pub(crate) const UNLEASED: u32 = u32::MAX - 1;

/// An admitted request. Complete it with the response status: a billable status records the
/// usage, any other gives the reserved units back. A ticket dropped without
/// [`complete`](Self::complete) (the request was cancelled, or the service failed) gives its
/// units back too.
#[must_use = "complete the ticket with the response status, or its usage is refunded"]
pub struct Ticket {
    pub(crate) state: Tenant,
    /// The meter, and what the rate-limit headers report.
    pub(crate) headers: HeaderState,
    /// The tag of the quota period the units were taken from (`NO_TAG`: none were).
    pub(crate) quota_tag: u32,
    pub(crate) at: i64,
    pub(crate) claim: Option<Box<Claim>>,
    pub(crate) cost: u32,
    /// `false` for an idempotent replay: nothing is charged or recorded.
    pub(crate) charged: bool,
    pub(crate) done: bool,
}

impl Ticket {
    /// The tenant.
    #[must_use]
    pub fn tenant(&self) -> &TenantId {
        &self.state.id
    }

    /// The tenant's plan.
    #[must_use]
    pub fn plan(&self) -> &PlanId {
        &self.state.plan.id
    }

    /// Whether this request repeats an `Idempotency-Key` already charged (it is not charged).
    #[must_use]
    pub fn is_replay(&self) -> bool {
        !self.charged
    }

    /// The handle to put in the request extensions.
    #[must_use]
    pub fn context(&self) -> TenantContext {
        TenantContext::new(self.state.clone(), self.charged)
    }

    /// Writes the rate-limit header fields of the response through `put`.
    pub fn for_each_header(&self, mut put: impl FnMut(Field, &str)) {
        self.emit(&mut |field, value| put(field, value.as_str()));
    }

    #[inline]
    pub(crate) fn emit(&self, put: &mut dyn FnMut(Field, Value<'_>)) {
        if self.state.plan.header_style != HeaderStyle::None {
            emit(&self.state.plan, &self.headers, None, Some(&self.state), put);
        }
    }

    /// Completes the request with its response status. Returns whether usage was recorded.
    #[allow(clippy::must_use_candidate)] // most callers need not know
    pub fn complete(mut self, status: u16) -> bool {
        self.done = true;
        if self.state.plan.billable.contains(status) {
            if self.charged {
                self.state.record(self.headers.meter(), self.at, u64::from(self.cost));
                self.state.plan.metrics.usage_units.increment(u64::from(self.cost));
                if let Some(claim) = self.claim.take() {
                    claim.done();
                }
                return true;
            }
            false
        } else {
            self.refund();
            false
        }
    }

    fn refund(&mut self) {
        if !self.charged {
            return;
        }
        if let Some(cell) = self.state.quota(self.headers.meter()) {
            if let Ok(tag) = u16::try_from(self.quota_tag) {
                cell.refund(u64::from(self.cost), tag);
            } else if self.quota_tag == UNLEASED {
                cell.refund_unleased(u64::from(self.cost), self.at);
            }
        }
        // Not billed: the key is released (the claim's drop), so a retry is charged.
        self.claim = None;
        self.state.plan.metrics.refunded_units.increment(u64::from(self.cost));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.refund();
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("tenant", &self.state.id)
            .field("plan", &self.state.plan.id)
            .field("cost", &self.cost)
            .field("charged", &self.charged)
            .finish_non_exhaustive()
    }
}
