//! Tenants: how a request names its tenant, and the per-tenant state on the request path.

mod clients;
mod fleet;
mod gcra;
mod handle;
mod key;
mod lock;
mod open;
mod state;

pub(crate) use crate::base::{check_api_key, draw_u64, KeyHash, COMMA_IN_KEY};
pub(crate) use clients::{client, lru, Client, ClientCells, ClientKeys};
pub(crate) use fleet::{FleetBucket, FleetCells};
pub(crate) use gcra::{GcraCell, TenantCells};
pub(crate) use handle::Tenant;
pub(crate) use key::Who;
pub use key::{Caller, Credential, Identity};
pub(crate) use key::{Fingerprinter, TAG_API_KEY, TAG_TENANT};
pub(crate) use lock::{CallLock, Turn};
pub(crate) use open::{Admit, OpenValues, Waiting};
pub(crate) use state::{Call, CallKind, InFlightCounts, PeriodBits, QuotaRef, Slot, Take, TenantState, Wanted};
