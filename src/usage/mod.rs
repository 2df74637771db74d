//! Usage as handlers see it: the [`TenantContext`] in the request extensions.

mod context;

pub use context::{Feature, QuotaStatus, RecordError, TenantContext};
