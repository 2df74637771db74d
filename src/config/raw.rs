//! The TOML document as written, before validation. Every table denies unknown keys.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) identify: RawIdentify,
    #[serde(default)]
    pub(crate) limits: RawLimits,
    #[serde(default)]
    pub(crate) usage: RawUsage,
    #[serde(default)]
    pub(crate) meters: BTreeMap<String, RawMeter>,
    #[serde(default)]
    pub(crate) plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(crate) tenants: BTreeMap<String, RawTenant>,
    pub(crate) store: Option<RawStore>,
    #[serde(default)]
    pub(crate) export: RawExport,
    pub(crate) stripe: Option<RawStripe>,
    pub(crate) metronome: Option<RawMetronome>,
    #[serde(default)]
    pub(crate) events: RawEvents,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetronome {
    pub(crate) api_base: Option<String>,
    pub(crate) api_token_file: Option<String>,
    pub(crate) timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvents {
    pub(crate) max_skew: Option<String>,
    pub(crate) store_timeout: Option<String>,
    #[serde(default)]
    pub(crate) products: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExport {
    pub(crate) interval: Option<String>,
    pub(crate) concurrency: Option<u64>,
    pub(crate) calls_per_second: Option<u64>,
    pub(crate) claim: Option<String>,
    pub(crate) unconfirmed_after: Option<String>,
    pub(crate) max_unknown_failures: Option<u64>,
    pub(crate) reconcile_after: Option<String>,
    pub(crate) reconcile_interval: Option<String>,
    pub(crate) sink: Option<String>,
    pub(crate) file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStripe {
    pub(crate) api_base: Option<String>,
    pub(crate) secret_key_file: Option<String>,
    pub(crate) webhook_secret_file: Option<String>,
    pub(crate) event_destination_secret_file: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) invoice_grace: Option<String>,
    #[serde(default)]
    pub(crate) events: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) subscription_status: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) prices: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) plan_order: Vec<String>,
    pub(crate) credits: Option<RawCredits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCredits {
    pub(crate) meter: String,
    #[serde(default)]
    pub(crate) prices: BTreeMap<String, i64>,
    pub(crate) expires_after: Option<String>,
    pub(crate) refunds: Option<String>,
    pub(crate) refund_attribution: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) kind: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) synchronous: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) schema: Option<String>,
    pub(crate) pool_size: Option<i64>,
    pub(crate) statement_timeout: Option<String>,
    pub(crate) migrate: Option<String>,
    pub(crate) ca_file: Option<String>,
    /// `[store.quota]`, `[store.usage]`, `[store.directory]`, `[store.idempotency]`: a store of
    /// that role's own (only under `[store]`).
    pub(crate) quota: Option<Box<RawStore>>,
    pub(crate) usage: Option<Box<RawStore>>,
    pub(crate) directory: Option<Box<RawStore>>,
    pub(crate) idempotency: Option<Box<RawStore>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentify {
    pub(crate) source: Option<String>,
    pub(crate) header: Option<String>,
    pub(crate) unknown: Option<String>,
    pub(crate) anonymous_plan: Option<String>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    pub(crate) forwarded_header: Option<String>,
    pub(crate) ipv6_prefix: Option<i64>,
    pub(crate) unknown_key_rate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub(crate) max_tenants: Option<u64>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) headers: Option<String>,
    pub(crate) idempotency_window: Option<String>,
    pub(crate) idempotency_max_in_flight: Option<String>,
    pub(crate) idempotency_capacity: Option<u64>,
    pub(crate) idempotency_keys_max: Option<u64>,
    pub(crate) idempotency_methods: Option<Vec<String>>,
    pub(crate) idempotency_max_body: Option<u64>,
    pub(crate) idempotency_max_request_body: Option<u64>,
    pub(crate) idempotency_buffer_bytes: Option<u64>,
    pub(crate) idempotency_store_bytes: Option<u64>,
    pub(crate) directory_ttl: Option<String>,
    pub(crate) negative_ttl: Option<String>,
    pub(crate) negative_capacity: Option<u64>,
    pub(crate) shadow: Option<bool>,
    pub(crate) max_clients: Option<u64>,
    pub(crate) balance_status: Option<i64>,
    pub(crate) background_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUsage {
    pub(crate) flush_interval: Option<String>,
    pub(crate) window: Option<String>,
    pub(crate) grace: Option<String>,
    pub(crate) billable: Option<Vec<String>>,
    pub(crate) bill_cancelled: Option<bool>,
    pub(crate) billable_grpc: Option<Vec<String>>,
    pub(crate) on_store_error: Option<String>,
    pub(crate) store_timeout: Option<String>,
    pub(crate) default_meter: Option<String>,
    pub(crate) shutdown_timeout: Option<String>,
    pub(crate) max_buffered_records: Option<u64>,
    pub(crate) notify_at: Option<Vec<i64>>,
    pub(crate) notify_left: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMeter {
    pub(crate) description: Option<String>,
    pub(crate) export: Option<bool>,
    pub(crate) event_name: Option<String>,
    pub(crate) aggregation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlan {
    pub(crate) rate: Option<String>,
    pub(crate) burst: Option<i64>,
    pub(crate) on_store_error: Option<String>,
    #[serde(default)]
    pub(crate) quotas: BTreeMap<String, RawQuota>,
    #[serde(default)]
    pub(crate) features: Vec<String>,
    pub(crate) shadow: Option<bool>,
    pub(crate) billed: Option<bool>,
    pub(crate) concurrency: Option<i64>,
}

/// A tenant's overrides of its plan: in the TOML (`[tenants.X.overrides]`), and as JSON in the
/// store's directory (the same keys).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOverride {
    pub(crate) rate: Option<String>,
    pub(crate) burst: Option<i64>,
    #[serde(default)]
    pub(crate) quotas: BTreeMap<String, RawQuota>,
    #[serde(default)]
    pub(crate) features: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuota {
    pub(crate) limit: Option<i64>,
    pub(crate) period: String,
    pub(crate) mode: Option<String>,
    pub(crate) anchor_day: Option<i64>,
    pub(crate) lease: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) method: Option<String>,
    pub(crate) path: String,
    pub(crate) meter: Option<String>,
    pub(crate) cost: Option<i64>,
    #[serde(default)]
    pub(crate) reports: Vec<String>,
    pub(crate) feature: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub(crate) plan: String,
    #[serde(default)]
    pub(crate) keys: Vec<String>,
    #[serde(default)]
    pub(crate) key_sha256: Vec<String>,
    pub(crate) stripe_customer: Option<String>,
    pub(crate) metronome_customer: Option<String>,
    pub(crate) overrides: Option<RawOverride>,
}
