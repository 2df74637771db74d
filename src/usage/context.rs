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

/// Why [`TenantContext::record`] refused a quantity (nothing was recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The meter is not declared in the configuration.
    #[error("unknown meter `{0}`")]
    UnknownMeter(String),
    /// The quantity is larger than `i64::MAX` (no meter counts that much at once; it is
    /// certainly a bug in the caller).
    #[error("the quantity {0} is larger than i64::MAX")]
    TooLarge(u64),
}

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
    /// also count against the tenant's quota on that meter: they happened, so a hard quota
    /// never refuses this request, but once it is spent it refuses the next requests on the
    /// routes that declare the meter in `reports` (recording on other routes still bills).
    /// Does nothing for a replayed request.
    ///
    /// # Errors
    /// [`RecordError::UnknownMeter`] when `meter` is not declared, [`RecordError::TooLarge`]
    /// for a quantity past `i64::MAX`.
    pub fn record(&self, meter: &str, quantity: u64) -> Result<(), RecordError> {
        let index = self.state.plan.meters.index(meter).ok_or_else(|| RecordError::UnknownMeter(meter.to_owned()))?;
        if i64::try_from(quantity).is_err() {
            return Err(RecordError::TooLarge(quantity));
        }
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
