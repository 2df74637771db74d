//! The keys of the DynamoStore's items: each role's partition and sort keys, and the keys of
//! its indexes.

use crate::base::{KeyHash, TenantId};
use crate::store::{ExportKey, QuotaKey};

/// The partition of the store's own settings.
pub(super) const META_PK: &str = "M";
/// The partition of the feed of tenants changed (`store::Changes`), one item.
pub(super) const CHANGES_PK: &str = "CHANGES";
/// The item holding the identifier namespace.
pub(super) const NAMESPACE_SK: &str = "namespace";

/// Separates the parts of a key: below every character a tenant id or a meter name may hold, so
/// that keys sort as their (tenant, meter, window) tuples do.
pub(super) const SEP: char = '\u{1}';

pub(super) fn quota_pk(key: &QuotaKey) -> String {
    format!("Q{SEP}{}{SEP}{}", key.tenant, key.meter)
}

pub(super) fn quota_sk(key: &QuotaKey) -> String {
    format!("{}{SEP}{}{SEP}{}", key.period_tag(), window_text(key.start), window_text(key.end))
}

pub(super) fn tenant_pk(tenant: &TenantId) -> String {
    format!("T{SEP}{tenant}")
}

/// The partition of a tenant's payments row (`store::PaymentRow`), one item.
pub(super) fn payments_pk(tenant: &TenantId) -> String {
    format!("PAID{SEP}{tenant}")
}

pub(super) fn usage_pk(tenant: &TenantId) -> String {
    format!("U{SEP}{tenant}")
}

pub(super) fn usage_sk(meter: &str, window_start: i64) -> String {
    format!("{meter}{SEP}{}", window_text(window_start))
}

/// The sort key of an aggregate in the indexes: (tenant, meter, window) order.
pub(super) fn usage_gsk(key: &ExportKey) -> String {
    format!("{}{SEP}{}{SEP}{}", key.tenant, key.meter, window_text(key.window_start))
}

pub(super) fn key_pk(key: &KeyHash) -> String {
    format!("K{SEP}{}", key.to_hex())
}

pub(super) fn keys_gpk(tenant: &TenantId) -> String {
    format!("KEYS{SEP}{tenant}")
}

pub(super) fn idempotency_pk(key: &str) -> String {
    format!("I{SEP}{key}")
}

/// The partition of a tenant's credit grants (sort key: meter, then grant id).
pub(super) fn credit_pk(tenant: &TenantId) -> String {
    format!("CR{SEP}{tenant}")
}

pub(super) fn credit_sk(meter: &str, id: &str) -> String {
    format!("{meter}{SEP}{id}")
}

/// The marker of a payment intent's grant (one per payment): its tenant, meter and grant id.
pub(super) fn payment_pk(payment: &str) -> String {
    format!("PAY{SEP}{payment}")
}

/// The marker of a grant id of a tenant (one grant per id on every meter of the tenant).
pub(super) fn grant_id_pk(tenant: &TenantId, id: &str) -> String {
    format!("GID{SEP}{tenant}{SEP}{id}")
}

/// A refund kept until its grant lands, by payment (or invoice).
pub(super) fn kept_refund_pk(payment: &str) -> String {
    format!("REFUND{SEP}{payment}")
}

/// The count of refunds kept on one day (`REFUNDS_KEPT_MAX` shared out over their 35 days).
pub(super) fn kept_refunds_count_pk(day: i64) -> String {
    format!("REFUNDS_KEPT{SEP}{day}")
}

/// The sort key of the markers, kept refunds and counts above.
pub(super) const ONE_SK: &str = "-";

/// The index partition of open grants that expire.
pub(super) const CREDIT_DUE_GPK: &str = "CREDITDUE";

/// The partition of a tenant's shared rate (sort key [`ONE_SK`]).
pub(super) fn rate_pk(tenant: &TenantId) -> String {
    format!("R{SEP}{tenant}")
}

/// The partition of a tenant's places (sort key [`ONE_SK`]).
pub(super) fn places_pk(tenant: &TenantId) -> String {
    format!("PL{SEP}{tenant}")
}

/// The partition of a tenant's values of open dimensions; one item per (meter, dimension,
/// month), its sort key [`values_sk`].
pub(super) fn values_pk(tenant: &TenantId) -> String {
    format!("DV{SEP}{tenant}")
}

/// The sort key of a tenant's values of `dimension` of `meter` in the month starting at `start`.
pub(super) fn values_sk(meter: &str, dimension: &str, start: i64) -> String {
    format!("{meter}{SEP}{dimension}{SEP}{}", window_text(start))
}

pub(super) fn customer_pk(customer: &str) -> String {
    format!("C{SEP}{customer}")
}

/// The partition of the tallies of one UTC day: the fleet's minutes (sort key: the minute's
/// start) or the tenants' (sort key: the tenant).
pub(super) fn tally_pk(scope: &crate::store::TallyScope, day: i64) -> String {
    match scope {
        crate::store::TallyScope::Fleet => format!("TF{SEP}{}", window_text(day)),
        crate::store::TallyScope::Tenant(_) => format!("TT{SEP}{}", window_text(day)),
    }
}

/// A window start as text that sorts as the number does (negative ones included).
pub(super) fn window_text(w: i64) -> String {
    format!("{:016x}", (w as u64) ^ (1 << 63))
}
