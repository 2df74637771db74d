//! Tenants: how a request names its tenant, and the per-tenant state on the request path.

mod handle;
mod key;
mod state;

pub(crate) use handle::Tenant;
pub(crate) use key::{check_api_key, draw_u64, Fingerprinter, COMMA_IN_KEY, TAG_API_KEY, TAG_TENANT};
pub use key::{Credential, Identity, KeyHash};
pub(crate) use state::{Call, CallKind, GcraCell, PeriodBits, QuotaRef, Take, TenantCells, TenantState};
