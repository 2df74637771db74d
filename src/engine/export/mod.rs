//! The billing export: windows of usage sent to the billing sink exactly once, and the
//! reconciliation of what was sent with what the billing system holds.

pub(crate) mod exporter;
pub(crate) mod reconcile;
