use std::fmt;

use crate::{
    config::{PlanId, TenantId},
    tenant::Tenant,
};

/// The tenant of an admitted request, in its extensions: who is calling, on which plan, and a
/// handle to record extra usage on other meters (such as tokens computed from the response).
///
/// ```no_run
/// use axum::Extension;
/// use tollgate::TenantContext;
///
/// async fn generate(Extension(ctx): Extension<TenantContext>) -> String {
///     let tokens = 1234; // computed by the handler
///     ctx.record("tokens", tokens).expect("the tokens meter is declared");
///     format!("{} on {}", ctx.tenant(), ctx.plan())
/// }
/// ```
#[derive(Clone)]
pub struct TenantContext {
    state: Tenant,
    charged: bool,
}

/// The meter named in [`TenantContext::record`] is not declared in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown meter `{0}`")]
pub struct UnknownMeter(pub String);

impl TenantContext {
    pub(crate) fn new(state: Tenant, charged: bool) -> Self {
        Self { state, charged }
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.state.id
    }

    /// The tenant's plan.
    pub fn plan(&self) -> &PlanId {
        &self.state.plan.id
    }

    /// The tenant's billing customer, if the directory knows it.
    pub fn customer(&self) -> Option<&str> {
        self.state.customer.as_deref()
    }

    /// Whether this request repeats an `Idempotency-Key` already charged.
    pub fn is_replay(&self) -> bool {
        !self.charged
    }

    /// Records `quantity` units of `meter` for the tenant, in the current window. The units
    /// also count against the tenant's quota on that meter (they happened: a hard quota
    /// rejects the next requests, never this one). Does nothing for a replayed request.
    ///
    /// # Errors
    /// [`UnknownMeter`] when `meter` is not declared.
    pub fn record(&self, meter: &str, quantity: u64) -> Result<(), UnknownMeter> {
        let index = self.state.plan.meters.index(meter).ok_or_else(|| UnknownMeter(meter.to_owned()))?;
        if !self.charged || quantity == 0 {
            return Ok(());
        }
        let now = self.state.clock.unix_secs();
        self.state.record(index, now, quantity);
        if let Some(cell) = self.state.quota(index) {
            cell.force_take(quantity, now);
        }
        self.state.plan.metrics.usage_units.increment(quantity);
        Ok(())
    }
}

impl fmt::Debug for TenantContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantContext")
            .field("tenant", &self.state.id)
            .field("plan", &self.state.plan.id)
            .field("replay", &!self.charged)
            .finish()
    }
}
