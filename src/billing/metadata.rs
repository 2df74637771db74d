//! The metadata tollgate writes on a recharge's invoice, and reads back from its events: a leaf
//! that the webhook handler and the recharge charger both read, so neither imports the other.

/// The metadata key naming a recharge's number on its invoice.
pub(crate) const RECHARGE_KEY: &str = "tollgate_recharge";
/// The metadata key naming a recharge's meter on its invoice.
pub(crate) const METER_KEY: &str = "tollgate_meter";
/// The metadata key naming a recharge's tenant on its invoice.
pub(crate) const TENANT_KEY: &str = "tollgate_tenant";
/// The metadata key of a recharge's identity (the stem of its idempotency keys).
pub(crate) const ID_KEY: &str = "tollgate_recharge_id";

/// Whether an event's object (`data.object`) is a recharge's invoice: its metadata names the
/// recharge.
pub(crate) fn is_recharge(object: &serde_json::Value) -> bool {
    object["metadata"][RECHARGE_KEY].is_string()
}
