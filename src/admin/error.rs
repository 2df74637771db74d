//! Why an administrative operation was refused.

use crate::store::StoreError;

/// Why an administrative operation was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The plan is not in the configuration.
    #[error("no plan `{0}` in the configuration")]
    UnknownPlan(String),
    /// No such tenant.
    #[error("no tenant `{0}`")]
    UnknownTenant(String),
    /// The tenant exists already.
    #[error("tenant `{0}` exists already")]
    TenantExists(String),
    /// The tenant has no key with this id.
    #[error("tenant `{tenant}` has no key `{id}`")]
    UnknownKey {
        /// The tenant.
        tenant: String,
        /// The key id asked for.
        id: String,
    },
    /// A value is not valid (a tenant id, a customer id).
    #[error("{0}")]
    Invalid(String),
    /// The billing customer belongs to another tenant: moving it would make that tenant's
    /// usage unbillable and send its customer's webhooks to this one.
    #[error("billing customer `{customer}` belongs to tenant `{holder}`: a customer belongs to one tenant; move it explicitly (--move) if that is meant")]
    CustomerHeld {
        /// The customer.
        customer: String,
        /// The tenant holding it.
        holder: String,
    },
    /// A tenant's alert endpoint was refused: nothing was stored.
    #[error(transparent)]
    AlertEndpoint(crate::settings::endpoint::EndpointError),
    /// A tenant's spend cap was refused (or could not be read): nothing was stored.
    #[error(transparent)]
    SpendCap(crate::settings::caps::CapError),
    /// A tenant's recharge was refused (or could not be read): nothing was stored.
    #[error(transparent)]
    Recharge(crate::settings::recharge::RechargeError),
    /// A line of an import is not valid: nothing was imported.
    #[error("line {line}: {message}")]
    Import {
        /// The line (1-based, the header is line 1).
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}
