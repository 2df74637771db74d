//! Spend caps tenants set themselves: kept by the quota store beside the tenant's spend
//! counters (a mode of `reserve`, [`CapMode::Set`]), so that every reservation of every node is
//! held to them; bounded by the plan's `spend.max_limit` (with the operator's overrides).
//! Set through [`Admin::set_spend_cap`](crate::Admin::set_spend_cap), the CLI and the route an
//! application mounts for its tenants ([`Tollgate::tenant_spend_cap`](crate::Tollgate::tenant_spend_cap)).

use super::plan::{served_tenant, Unserved};
use crate::{
    base::{QuotaMode, TenantId},
    config::{amount_of, Config, SPEND_METER},
    store::{CapMode, DirectoryStore, QuotaKey, QuotaStore, Reservation, ReserveToken, SpendCap, StoreError},
};

/// The sender of every cap's store call: one entry in the counter's senders, however many
/// calls (each call's sequence number is its time in nanoseconds).
const CAP_SENDER: u64 = 0x7370_656e_6463_6170; // "spendcap"

/// Why a tenant's own spend cap was refused: nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CapError {
    /// No such tenant (in the file nor the directory).
    #[error("no tenant `{0}`")]
    UnknownTenant(String),
    /// The tenant's plan (with its overrides) has no spend cap.
    #[error("plan `{0}` has no spend cap (spend = {{ ... }}): there is nothing to set")]
    NoSpendCap(String),
    /// The limit is not an amount of the currency (a decimal, more than 0, at most 9
    /// decimals).
    #[error("{0}")]
    NotAnAmount(String),
    /// The limit is above the most the tenant may set: the plan's `spend.max_limit`, or the
    /// operator's override.
    #[error("{asked} is above the most this tenant may set: {max}")]
    AboveMax {
        /// The limit asked, as a decimal of the currency.
        asked: String,
        /// The most, as a decimal of the currency.
        max: String,
    },
    /// A soft cap asked on a plan whose cap is hard: a tenant's own cap never turns the
    /// operator's hard stop into a warning.
    #[error("the plan's spend cap is hard: a cap of the tenant's own is hard too")]
    SoftUnderHard,
    /// The tenant's plan cannot be served under this configuration (its overrides name a
    /// meter or feature it does not have): the engine refuses its requests until the
    /// operator mends them, and nothing can be set meanwhile.
    #[error("the tenant's plan is not served: {0}")]
    NotServed(String),
    /// The store failed (nothing may have been stored; sending it again is safe).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A tenant's spend cap: the plan's (with the operator's overrides), the tenant's own if it
/// set one, and the one in force. Amounts in nano-units of the currency.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpendCapView {
    /// The currency (`[billing] currency`).
    pub currency: String,
    /// The cap in force: the tenant's own hard cap when set (at most `max_limit`), or its
    /// soft cap on a plan with a soft one, else the plan's.
    pub limit: u64,
    /// Whether the cap in force is hard.
    pub hard: bool,
    /// The plan's cap, and whether it is hard.
    pub plan_limit: u64,
    /// The plan's mode.
    pub plan_hard: bool,
    /// The most the tenant may set.
    pub max_limit: u64,
    /// The tenant's own cap, if it set one (kept across plan changes).
    pub own: Option<SpendCap>,
    /// Whether the tenant's own cap is the one in force (not a soft one under a plan whose
    /// cap is hard).
    pub own_in_force: bool,
}

impl SpendCapView {
    /// As the tenant's route answers it (amounts as decimal strings of the currency).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let mode = |hard: bool| if hard { "hard" } else { "soft" };
        serde_json::json!({
            "currency": self.currency,
            "limit": amount_of(self.limit).to_string(),
            "mode": mode(self.hard),
            "max_limit": amount_of(self.max_limit).to_string(),
            "plan_limit": amount_of(self.plan_limit).to_string(),
            "set_by": if self.own_in_force { "tenant" } else { "plan" },
        })
    }
}

/// What a call does with a tenant's own cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapAct {
    /// Reads it.
    Read,
    /// Sets it.
    Set(SpendCap),
    /// Sets a cap of this limit in the mode of the plan's cap (with its overrides).
    SetInPlanMode(u64),
    /// Removes it: the plan's holds again.
    Remove,
}

/// Reads, sets or removes a tenant's own spend cap (`act`), at `now` (Unix seconds).
pub(crate) async fn spend_cap(
    quota: &dyn QuotaStore,
    directory: &dyn DirectoryStore,
    config: &Config,
    tenant: &TenantId,
    act: CapAct,
    now: i64,
) -> Result<SpendCapView, CapError> {
    let plan = match served_tenant(directory, config, tenant).await? {
        Ok((_, served)) => served.spec,
        Err(Unserved::UnknownTenant) => return Err(CapError::UnknownTenant(tenant.to_string())),
        Err(Unserved::UnknownPlan(plan)) => return Err(CapError::NoSpendCap(plan.to_string())),
        Err(Unserved::Unreadable(why)) => return Err(CapError::NotServed(why)),
    };
    let Some(spec) = plan.spend() else { return Err(CapError::NoSpendCap(plan.id().to_string())) };
    let currency = config.billing().currency.clone().unwrap_or_default();
    let max = plan.spend_max().unwrap_or(spec.limit().get());
    let plan_hard = spec.mode() == QuotaMode::Hard;
    let act = match act {
        CapAct::SetInPlanMode(limit) => CapAct::Set(SpendCap::new(limit, plan_hard)),
        act => act,
    };
    if let CapAct::Set(cap) = act {
        if plan_hard && !cap.hard {
            return Err(CapError::SoftUnderHard);
        }
        if cap.limit == 0 {
            return Err(CapError::NotAnAmount("a cap of more than 0".into()));
        }
        if cap.limit > max {
            return Err(CapError::AboveMax {
                asked: amount_of(cap.limit).to_string(),
                max: amount_of(max).to_string(),
            });
        }
    }
    // Read from the counters; through a reservation of nothing when there are none (an idle
    // tenant's rows are swept, its cap is kept).
    if act == CapAct::Read {
        let counters = quota.counters(tenant, &SPEND_METER.into()).await?;
        if !counters.is_empty() {
            let own = counters.into_iter().find_map(|c| c.cap);
            return Ok(view(spec, currency, max, own));
        }
    }
    let mode = match act {
        CapAct::Set(cap) => CapMode::Set(Some(cap)),
        CapAct::Remove => CapMode::Set(None),
        CapAct::Read | CapAct::SetInPlanMode(_) => CapMode::Stored,
    };
    let (start, end) = spec.period().bounds(now);
    let key = QuotaKey::new(tenant.clone(), SPEND_METER.into(), spec.period(), start, end);
    let seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let token = ReserveToken::new(CAP_SENDER, seq).at(now);
    let limit = plan_hard.then(|| spec.limit().get());
    let r = Reservation::new(key, 0, 0, limit, token).capped(mode).cap_within(max);
    let own = quota.reserve(&r).await?.cap;
    Ok(view(spec, currency, max, own))
}

/// The view of a tenant's cap under its plan's spend quota `spec` (its maximum `max`) with
/// its own cap `own`, as stored.
pub(crate) fn view(spec: &crate::config::QuotaSpec, currency: String, max: u64, own: Option<SpendCap>) -> SpendCapView {
    let (limit, hard) = spec.in_force(own);
    let in_force = spec.own_in_force(own).is_some();
    SpendCapView {
        currency,
        limit,
        hard,
        plan_limit: spec.limit().get(),
        plan_hard: spec.mode() == QuotaMode::Hard,
        max_limit: max,
        own,
        own_in_force: in_force,
    }
}

/// A quota's limit in force and its mode, as the quota store's counters say: a prepaid
/// balance's is what its open grants granted (`granted`; 0 before any); a spend cap's, the
/// tenant's own cap within the plan's ([`QuotaSpec::in_force`](crate::config::QuotaSpec));
/// any other quota's, the plan's. The usage route and the dashboard both read it so.
pub(crate) fn limit_in_force(
    spec: &crate::config::QuotaSpec,
    granted: Option<u64>,
    own: Option<SpendCap>,
) -> (u64, QuotaMode) {
    let mode = |hard: bool| if hard { QuotaMode::Hard } else { QuotaMode::Soft };
    if spec.period() == crate::base::Period::Prepaid {
        (granted.unwrap_or(0), spec.mode())
    } else if spec.capped {
        let (limit, hard) = spec.in_force(own);
        (limit, mode(hard))
    } else {
        (spec.limit().get(), spec.mode())
    }
}

/// A cap written as a decimal amount and a mode.
///
/// # Errors
/// [`CapError::NotAnAmount`].
pub(crate) fn parse(limit: &str, hard: bool) -> Result<SpendCap, CapError> {
    let nanos = crate::base::parse_cap(limit).map_err(CapError::NotAnAmount)?;
    Ok(SpendCap::new(nanos, hard))
}

/// The most bytes of a body the spend cap route reads.
pub(crate) const MAX_BODY: usize = 1024;
