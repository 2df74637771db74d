//! A tenant's settings: the rules of what a tenant is served and may set for itself, on the
//! configuration and the stores alone (no engine state). The engine compiles the served plan
//! for the request path and answers the tenant routes; `Admin`, the dashboard and the worker's
//! recharge delivery read the same rules.
//!
//! - `plan.rs`: the one served-plan rule (a tenant's plan, the overrides that fit it, what was
//!   dropped and why);
//! - `caps.rs`: a tenant's own spend cap within its plan's `spend.max_limit`, and a quota's
//!   limit in force;
//! - `recharge.rs`: a tenant's own auto-recharge within its plan's bounds;
//! - `endpoint.rs`: a tenant's own alert endpoint, checked at registration;
//! - `scopes.rs`: what a caller may do at its tenant's own routes (its key's scopes).
//!
//! It sits below the engine and above `billing/` (the recharge price is read through its
//! charger), and imports nothing above itself; refusals become problem+json in the engine's
//! tenant routes.

pub(crate) mod caps;
pub(crate) mod endpoint;
pub(crate) mod plan;
pub(crate) mod recharge;
pub(crate) mod scopes;
