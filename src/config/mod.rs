//! Configuration: plans, meters, routes and tenant identification, read from one TOML file.
//!
//! The file is parsed once into typed values ([`Config`]); nothing at request time looks at
//! strings from the file. Every error names the file, line, column and key path, and unknown
//! keys are errors. The complete reference is the [configuration guide](crate::guide::configuration).

mod error;
pub(crate) mod net;
mod raw;
mod route;
mod validate;

pub(crate) use validate::ANONYMOUS_TENANT;
mod values;

use std::{collections::BTreeMap, num::NonZeroU32, num::NonZeroU64, path::Path, time::Duration};

pub use crate::base::{InvalidTenantId, MeterId, Period, PlanId, QuotaMode, SinkKind, TenantId};
pub use error::{ConfigError, ConfigErrorKind};
pub use net::{ForwardedHeader, IpRange};
pub(crate) use route::normalize_path;
pub use route::RoutePattern;
pub use values::{
    HeaderStyle, Identify, Migrate, OnUnknown, PostgresSettings, Rate, RateError, StatusSet, StoreErrorPolicy,
    StoreSettings, Synchronous,
};

/// A parsed and validated configuration.
///
/// ```
/// let config = tollgate::Config::from_toml_str(r#"
///     [plans.free]
///     rate = "10/s"
///     burst = 20
///     quotas.requests = { limit = 1000, period = "day", mode = "hard" }
///
///     [tenants.acme]
///     plan = "free"
///     keys = ["tg_test_acme"]
/// "#).unwrap();
/// assert_eq!(config.plans().len(), 1);
/// assert_eq!(config.plan(&"free".into()).unwrap().burst().get(), 20);
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) identify: Identify,
    pub(crate) on_unknown: OnUnknown,
    pub(crate) limits: Limits,
    pub(crate) usage: UsageSettings,
    pub(crate) meters: Vec<MeterSpec>,
    pub(crate) default_meter: MeterId,
    pub(crate) plans: BTreeMap<PlanId, PlanSpec>,
    pub(crate) routes: Vec<RouteSpec>,
    pub(crate) tenants: Vec<TenantSpec>,
    pub(crate) store: StoreSettings,
    /// The stores of the roles that have one of their own (`[store.directory]` and the others).
    pub(crate) store_roles: StoreRoles,
    pub(crate) export: ExportSettings,
    pub(crate) stripe: Option<StripeSettings>,
    pub(crate) metronome: Option<MetronomeSettings>,
    pub(crate) events: EventSettings,
    pub(crate) clients: ClientSettings,
    /// Whether the file has a `[store]` section, and where its keys are (for reload errors).
    pub(crate) store_written: Option<StoreOrigin>,
    /// The file the configuration was read from.
    pub(crate) file: Option<std::path::PathBuf>,
}

/// A role a store plays, as the configuration can name a store for it apart from `[store]`
/// (`[store.quota]`, `[store.usage]`, `[store.directory]`, `[store.idempotency]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreRole {
    /// Quota counters (`QuotaStore`).
    Quota,
    /// Usage and its export, which share the aggregates (`UsageStore` and `ExportStore`).
    Usage,
    /// The tenant directory (`DirectoryStore`).
    Directory,
    /// `Idempotency-Key` bindings (`IdempotencyStore`).
    Idempotency,
}

impl StoreRole {
    /// Every role.
    pub const ALL: [StoreRole; 4] = [StoreRole::Quota, StoreRole::Usage, StoreRole::Directory, StoreRole::Idempotency];

    /// The role's name in the configuration (`[store.NAME]`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            StoreRole::Quota => "quota",
            StoreRole::Usage => "usage",
            StoreRole::Directory => "directory",
            StoreRole::Idempotency => "idempotency",
        }
    }
}

/// The stores named for a role of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StoreRoles {
    pub(crate) quota: Option<StoreSettings>,
    pub(crate) usage: Option<StoreSettings>,
    pub(crate) directory: Option<StoreSettings>,
    pub(crate) idempotency: Option<StoreSettings>,
}

impl StoreRoles {
    pub(crate) fn get(&self, role: StoreRole) -> Option<&StoreSettings> {
        match role {
            StoreRole::Quota => self.quota.as_ref(),
            StoreRole::Usage => self.usage.as_ref(),
            StoreRole::Directory => self.directory.as_ref(),
            StoreRole::Idempotency => self.idempotency.as_ref(),
        }
    }
}

/// Where the `[store]` section and its keys stand in the file.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreOrigin {
    pub(crate) section: Option<(usize, usize)>,
    pub(crate) keys: BTreeMap<&'static str, (usize, usize)>,
}

/// Bounds on the engine's memory and the response headers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// The most tenants whose state is kept; idle tenants beyond it are evicted.
    pub max_tenants: usize,
    /// A tenant not seen for this long is evicted (its usage flushed, its lease returned).
    pub idle_timeout: Duration,
    /// Which rate-limit headers responses carry.
    pub headers: HeaderStyle,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_window: Duration,
    /// How long a request may hold its `Idempotency-Key` in flight in all: its claim is renewed
    /// while it runs, up to this; past it the key is released (and counted).
    pub idempotency_max_in_flight: Duration,
    /// The most `Idempotency-Key`s remembered at once.
    pub idempotency_capacity: u64,
    /// The most `Idempotency-Key` bindings the store holds for the whole fleet
    /// (`idempotency_keys_max`, 2^24 by default): past it a new key is not bound, its request
    /// is served without it and counted (`outcome="keys_full"`); a live binding is never
    /// deleted to make room. SQLite and the memory store hold at most 2^20 whatever this says;
    /// DynamoDB expires bindings by TTL and has no count.
    pub idempotency_keys_max: u64,
    /// The methods whose `Idempotency-Key` is honoured (`POST` and `PATCH` by default: the
    /// others are idempotent by definition, and their key is not even read).
    pub idempotency_methods: Vec<http::Method>,
    /// The longest response body stored for replays of an `Idempotency-Key` (64 KiB by
    /// default; at most 350,000 bytes on a DynamoDB idempotency store). A longer response is
    /// not stored: its key is released, and a retry runs again and is billed.
    pub idempotency_max_body: u64,
    /// The most request body bytes read to fingerprint an `Idempotency-Key`'s request (1 MiB
    /// by default): a body the handler left unread is drained up to it; past it, the key is
    /// bound without the body, and replays are not compared with it.
    pub idempotency_max_request_body: u64,
    /// The most response bytes this node holds at once while responses stream to be stored
    /// (64 MiB by default): a response that would go past it is not stored (its key is
    /// released), counted.
    pub idempotency_buffer_bytes: u64,
    /// The most bytes of stored responses the idempotency store holds at once (1 GiB by
    /// default): a response that would go past it is not stored (its key is released),
    /// counted.
    pub idempotency_store_bytes: u64,
    /// How long a node trusts its cached tenant directory entry: removed keys and plan changes
    /// made in the store reach running nodes within this time.
    pub directory_ttl: Duration,
    /// How long an unknown credential is remembered as unknown (so repeated unknown keys do
    /// not each cost a store lookup).
    pub negative_ttl: Duration,
    /// The most unknown credentials remembered at once (least recently used go first).
    pub negative_capacity: u64,
    /// The whole configuration in shadow mode: every decision is computed, counted and
    /// logged, but nothing is refused (unidentified requests pass too).
    pub shadow: bool,
    /// The most client addresses whose rate state is held for anonymous callers (least
    /// recently used go first).
    pub max_clients: u64,
    /// The status of a request refused because a prepaid balance is empty: `402 Payment
    /// Required` by default ([`RejectionKind::CreditsExhausted`](crate::response::RejectionKind::CreditsExhausted)),
    /// or `429` ([`RejectionKind::QuotaExceeded`](crate::response::RejectionKind::QuotaExceeded)).
    /// Neither carries `Retry-After`: a balance comes back with a payment, not with time.
    pub balance_status: u16,
    /// The longest one store call of background work may take (10 s by default): the flush,
    /// the export and reconciliation passes, webhooks, [`Admin`](crate::admin::Admin), the
    /// settlement of `Idempotency-Key` claims and the worker's passes. They never fail fast;
    /// the request path's calls are bounded by `usage.store_timeout` instead.
    pub background_timeout: Duration,
}

/// Where a request comes from, for anonymous callers limited per client address
/// (`[identify]` `trusted_proxies`, `ipv6_prefix`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientSettings {
    /// Proxies whose forwarding header entries are believed.
    pub trusted_proxies: Vec<IpRange>,
    /// The header those proxies write the client's address in (only that one is read).
    pub forwarded_header: ForwardedHeader,
    /// IPv6 clients are grouped by this many leading bits (64 by default).
    pub ipv6_prefix: u8,
    /// How many API keys the directory is asked about per client address (10 a minute by
    /// default, at once up to the count): past it the address gets 429 (the key may be valid).
    /// Keys the directory knows are not counted.
    pub unknown_key_rate: Rate,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            ipv6_prefix: 64,
            unknown_key_rate: "10/min".parse().expect("a valid rate"),
        }
    }
}

/// How usage is aggregated, flushed and billed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UsageSettings {
    /// How often the worker writes aggregated usage to the store.
    pub flush_interval: Duration,
    /// The length of an aggregation window (one billing meter event per tenant, meter, window).
    pub window: Duration,
    /// How long after its end a window is exported (late usage still lands in it).
    pub grace: Duration,
    /// Which statuses are billed; the others give their units back.
    pub billable: StatusSet,
    /// Whether a request cut off (the client gone) once the service had it is billed as a
    /// completed one (true by default); a request cut off before always gives its units back.
    pub bill_cancelled: bool,
    /// The gRPC status codes billed, a bit per code (0 to 16): by default those whose HTTP
    /// equivalent `billable` bills (`OK` and the client errors; not `INTERNAL`, `UNAVAILABLE`
    /// and the other server-side failures).
    pub(crate) billable_grpc: u32,
    /// The default policy when the store cannot be reached.
    pub on_store_error: StoreErrorPolicy,
    /// Whether the file set `on_store_error`. Unset, each quota follows its mode: a hard
    /// quota fails closed (it is never passed), a soft one fails open.
    pub(crate) on_store_error_set: bool,
    /// How long a request may wait on the store before `on_store_error` applies.
    pub store_timeout: Duration,
    /// How long `shutdown()` keeps retrying the final flush and export while the store is down.
    pub shutdown_timeout: Duration,
    /// The most usage records (tenant × meter × window) held in memory while the store does
    /// not take them. When full, `on_store_error` decides: fail-closed tenants are refused
    /// (503) until the store takes the usage; fail-open usage past the bound is dropped,
    /// counted and logged.
    pub max_buffered_records: usize,
    /// The quota thresholds, in percent of the limit, at which the
    /// [`on_threshold`](crate::Builder::on_threshold) hook is called (80 and 100 by default).
    pub notify_at: Vec<u16>,
    /// Thresholds in units left (`[1000]`: when 1,000 units or fewer are left), at which the
    /// [`on_threshold`](crate::Builder::on_threshold) hook is called too (none by default):
    /// for prepaid balances, whose limit moves with each grant, most of all.
    pub notify_left: Vec<u64>,
}

/// How the billing system's meter aggregates the events of a meter (`aggregation` in
/// `[meters.<name>]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum MeterAggregation {
    /// Every event adds to the total (a Stripe meter with `sum`): each export sends the
    /// units not sent before, and late usage goes out as a delta.
    #[default]
    Sum,
    /// Pre-aggregated per hour (a Stripe meter with `event_time_window = hour`): the meter
    /// keeps only the newest event of each hour, so each export sends the hour's running
    /// total.
    Hour,
    /// Pre-aggregated per day (`event_time_window = day`), as [`Hour`](Self::Hour).
    Day,
}

impl MeterAggregation {
    /// The billing meter's window, in seconds, for a pre-aggregated meter.
    #[must_use]
    pub fn window_secs(self) -> Option<i64> {
        match self {
            Self::Sum => None,
            Self::Hour => Some(3600),
            Self::Day => Some(86_400),
        }
    }
}

/// A meter: something that is counted and billed.
#[derive(Debug, Clone)]
pub struct MeterSpec {
    pub(crate) id: MeterId,
    pub(crate) event_name: String,
    pub(crate) description: Option<String>,
    pub(crate) aggregation: MeterAggregation,
    pub(crate) export: bool,
}

impl MeterSpec {
    /// Whether the meter's usage is exported to the billing sink (`export`, `true` by
    /// default). A meter that is not (a prepaid balance's, paid for up front) is counted,
    /// limited and reported all the same; its pending windows are parked as never exported.
    #[must_use]
    pub fn exported(&self) -> bool {
        self.export
    }

    /// The meter's name.
    #[must_use]
    pub fn id(&self) -> &MeterId {
        &self.id
    }

    /// The billing event name (the Stripe meter's `event_name`); the meter's name by default.
    #[must_use]
    pub fn event_name(&self) -> &str {
        &self.event_name
    }

    /// The free-text description, if any.
    #[must_use]
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// How the billing meter aggregates its events.
    #[must_use]
    pub fn aggregation(&self) -> MeterAggregation {
        self.aggregation
    }
}

/// How closed windows are exported to the billing sink (`[export]`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExportSettings {
    /// How often the worker runs an export pass.
    pub interval: Duration,
    /// The most calls to the billing sink in flight at once from this node (one per customer
    /// and meter).
    pub concurrency: usize,
    /// The most calls to the billing sink per second, from this node.
    pub calls_per_second: u32,
    /// How long a node holds an aggregate it exports before another may take it over.
    pub claim: Duration,
    /// An export still unconfirmed this long after the first call that may have reached the
    /// billing system is not sent again but parked as `unconfirmed` for reconciliation:
    /// Stripe keeps idempotency keys for about 24 hours. Calls it certainly did not take (a
    /// refused connection, a 429) do not count.
    pub unconfirmed_after: Duration,
    /// How many failures whose cause is unknown (no status: a dropped connection, a body
    /// that is not the billing system's) an export takes before it is dead-lettered.
    pub max_unknown_failures: u32,
    /// How long after its export a meter event is compared with what the billing system
    /// holds: Stripe's summaries are eventually consistent, so younger ones are reported as
    /// settling. Also the least time between the two passes that prove an event lacking.
    pub reconcile_after: Duration,
    /// How often the worker runs a reconciliation pass; zero turns it off.
    pub reconcile_interval: Duration,
    /// The billing sink the configuration names (`export.sink`); `None` when the key is
    /// absent: Stripe if there is a `[stripe]` section, else none.
    pub sink: Option<SinkKind>,
    /// The file a `jsonl` sink appends to (`export.file`).
    pub file: Option<std::path::PathBuf>,
}

impl ExportSettings {
    /// The sink in force: `export.sink`, else Stripe when the configuration has `[stripe]`.
    #[must_use]
    pub fn sink_kind(&self, has_stripe: bool) -> Option<SinkKind> {
        self.sink.or(has_stripe.then_some(SinkKind::Stripe))
    }
}

/// `[metronome]`: where the Metronome sink sends events. The API token is never here: it comes
/// from `METRONOME_API_TOKEN` or the file `api_token_file` names.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MetronomeSettings {
    /// The API's base URL (`https://api.metronome.com/` by default; a local stand-in in tests):
    /// events go to `{api_base}v1/ingest`.
    pub api_base: Option<String>,
    /// A file holding the API token; `METRONOME_API_TOKEN` otherwise.
    pub api_token_file: Option<std::path::PathBuf>,
    /// How long one call may take (30 s by default).
    pub timeout: Duration,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            concurrency: 8,
            calls_per_second: 25,
            claim: Duration::from_secs(300),
            unconfirmed_after: Duration::from_secs(20 * 3600),
            max_unknown_failures: 8,
            reconcile_after: Duration::from_secs(3600),
            reconcile_interval: Duration::from_secs(6 * 3600),
            sink: None,
            file: None,
        }
    }
}

/// `[events]`: usage events recorded from jobs and queues
/// ([`Tollgate::record_event`](crate::Tollgate::record_event)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EventSettings {
    /// How far in the future an event's time may be (clock skew between the producer and
    /// this node) before the event is refused. Default 5 minutes.
    pub max_skew: Duration,
    /// Product codes of queue events (`ProductCode`) and the meter each one records.
    pub products: BTreeMap<String, MeterId>,
    /// How long one batch of events may take to be stored (a batch is written event by
    /// event on DynamoDB). Default 10 seconds.
    pub store_timeout: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self { max_skew: Duration::from_secs(300), products: BTreeMap::new(), store_timeout: Duration::from_secs(10) }
    }
}

impl EventSettings {
    /// The meter of a product code, if the configuration maps it.
    #[must_use]
    pub fn meter_of(&self, product: &str) -> Option<&MeterId> {
        self.products.get(product)
    }
}

/// Stripe (`[stripe]`): where the API is, where secrets are read from (never from this file),
/// and which webhook events move tenants between plans.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StripeSettings {
    /// The API's base URL (`https://api.stripe.com/` by default; a local stand-in in tests).
    pub api_base: Option<String>,
    /// A file holding the secret API key; `STRIPE_SECRET_KEY` otherwise.
    pub secret_key_file: Option<std::path::PathBuf>,
    /// A file holding the webhook signing secrets (one per line, several during a rotation);
    /// `STRIPE_WEBHOOK_SECRET` (comma-separated) otherwise.
    pub webhook_secret_file: Option<std::path::PathBuf>,
    /// A file holding the signing secrets of the event destination that sends Stripe's thin
    /// meter error events; `STRIPE_EVENT_DESTINATION_SECRET` (comma-separated) otherwise. Without
    /// either, thin events are refused.
    pub event_destination_secret_file: Option<std::path::PathBuf>,
    /// How long one API call may take.
    pub timeout: Duration,
    /// How long after a billing period ends Stripe still takes its usage into the period's
    /// invoice (`invoice_grace`, Stripe's invoice finalization grace: 1 h by default, at most
    /// 72 h; set it to your account's). A `sum` meter's revision exported later than this
    /// after its window is stamped at export time, so it reaches an open invoice.
    pub invoice_grace: Duration,
    /// Event type → the plan its customer moves to (`"payment_method.attached" = "metered"`).
    pub events: BTreeMap<String, PlanId>,
    /// Subscription status → what an event of a subscription in that status does
    /// (`past_due = "free"`, `incomplete = "ignore"`). `active` and `trialing` map through
    /// [`prices`](Self::prices) unless listed here. When subscriptions are mapped at all (by
    /// price or by status), every status Stripe has has an outcome: the file is refused
    /// otherwise.
    pub subscription_status: BTreeMap<String, StatusOutcome>,
    /// Price id or lookup key → plan, for active subscriptions.
    pub prices: BTreeMap<String, PlanId>,
    /// The plans subscriptions give, highest first (`plan_order`): when several live
    /// subscriptions of a customer give plans, the highest wins. Plans not listed rank below
    /// those listed; among equals, the subscription whose event came last wins.
    pub plan_order: Vec<PlanId>,
    /// Top-ups of prepaid balances from payments (`[stripe.credits]`), if configured.
    pub credits: Option<CreditSettings>,
}

/// Top-ups of prepaid balances from Stripe payments (`[stripe.credits]`): a paid checkout
/// session or invoice grants units, once per payment; a refund takes back what it refunds of
/// what the grant still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditSettings {
    /// The meter whose balance a payment tops up, unless the object's metadata names another
    /// (`tollgate_meter`). Some plan has a prepaid quota on it.
    pub meter: MeterId,
    /// Price id or lookup key → units granted per unit of quantity bought. A payment's units
    /// are the sum over its line items; an object whose metadata says `tollgate_units` grants
    /// that many instead.
    pub prices: BTreeMap<String, u64>,
    /// How long after the payment its grant expires (`expires_after`); never by default.
    pub expires_after: Option<Duration>,
    /// What a refund takes back.
    pub refunds: RefundPolicy,
    /// How money refunded of a payment that bought credits and other things is shared when
    /// nothing says which lines it was for (`refund_attribution`, `"pro_rata"` by default).
    pub refund_attribution: crate::base::RefundAttribution,
}

/// What a refund of a payment (`charge.refunded`) takes back from the grant it paid for
/// (`[stripe.credits] refunds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefundPolicy {
    /// `"proportional"` (the default): the units that the money refunded of the credit lines
    /// bought, at the grant's price per unit, at most what the grant still holds (see
    /// [`CreditRefund::units_for`](crate::store::CreditRefund::units_for)).
    Proportional,
    /// `"unspent"`: now the same as `"proportional"` (it took everything the grant held
    /// on any refund, a 1-cent one included, taking back units that were paid for). Kept so
    /// that configurations load.
    Unspent,
    /// `"ignore"`: refunds take nothing back (handle them by hand: `tollgate credits revoke`).
    Ignore,
}

/// What a webhook of a subscription in a given status does (`[stripe.subscription_status]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatusOutcome {
    /// The tenant moves to this plan.
    Plan(PlanId),
    /// Nothing changes (`"ignore"`): said explicitly, so no status is left unmapped by
    /// oversight.
    Ignore,
}

/// A plan: a rate with its burst, and quotas per meter.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    pub(crate) id: PlanId,
    pub(crate) rate: Option<Rate>,
    pub(crate) burst: NonZeroU32,
    pub(crate) on_store_error: Option<StoreErrorPolicy>,
    pub(crate) quotas: BTreeMap<MeterId, QuotaSpec>,
    pub(crate) features: std::collections::BTreeSet<String>,
    pub(crate) shadow: bool,
    pub(crate) billed: bool,
    pub(crate) concurrency: Option<NonZeroU32>,
}

impl PlanSpec {
    /// The most requests of one tenant in flight at once on a node (`concurrency = N`),
    /// counted from admission to the end of the response body; `None`: no limit.
    #[must_use]
    pub fn concurrency(&self) -> Option<NonZeroU32> {
        self.concurrency
    }

    /// Whether the plan's tenants must be billed (`billed = true`): with a billing sink that
    /// needs a customer, the windows of such a tenant without one stay pending until it has
    /// one (within the billing system's 35 days), never written off. Tenants with a customer
    /// are billed whatever their plan; tenants of other plans without one (a free tier) are
    /// not.
    #[must_use]
    pub fn billed(&self) -> bool {
        self.billed
    }

    /// The features the plan includes (`features = ["sso"]`): a route with `feature = "sso"`
    /// refuses tenants whose plan lacks it with 403.
    #[must_use]
    pub fn features(&self) -> &std::collections::BTreeSet<String> {
        &self.features
    }

    /// Whether the plan runs in shadow mode (decisions counted, nothing refused).
    #[must_use]
    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// The plan with a tenant's overrides merged over it: the override's rate (its burst, else
    /// the rate's own count) and burst replace the plan's, its quotas replace the plan's on
    /// the same meters, its features are added.
    #[must_use]
    pub fn with_override(&self, o: &PlanOverride) -> PlanSpec {
        let mut merged = self.clone();
        if let Some(rate) = o.rate {
            merged.rate = Some(rate);
            merged.burst = o.burst.unwrap_or(rate.count());
        } else if let Some(burst) = o.burst {
            merged.burst = burst;
        }
        for (m, q) in &o.quotas {
            merged.quotas.insert(m.clone(), q.clone());
        }
        merged.features.extend(o.features.iter().cloned());
        merged
    }

    /// The plan's name.
    #[must_use]
    pub fn id(&self) -> &PlanId {
        &self.id
    }

    /// The sustained rate, or `None` when the plan has no rate limit.
    #[must_use]
    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }

    /// How many cells may be spent at once (defaults to the rate's count).
    #[must_use]
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// The plan's policy when the store cannot be reached, if it overrides the global one.
    #[must_use]
    pub fn on_store_error(&self) -> Option<StoreErrorPolicy> {
        self.on_store_error
    }

    /// The quotas of the plan, by meter.
    #[must_use]
    pub fn quotas(&self) -> &BTreeMap<MeterId, QuotaSpec> {
        &self.quotas
    }
}

/// A quota on one meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSpec {
    pub(crate) limit: NonZeroU64,
    pub(crate) period: Period,
    pub(crate) mode: QuotaMode,
    pub(crate) lease: NonZeroU64,
}

impl QuotaSpec {
    /// Units allowed per period. A prepaid balance ([`Period::Prepaid`]) has no limit of its
    /// own (each tenant's open grants are its limit): this is then
    /// [`MAX_BALANCE`](crate::store::contract::MAX_BALANCE), the most a balance can hold.
    #[must_use]
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The calendar period.
    #[must_use]
    pub fn period(&self) -> Period {
        self.period
    }

    /// Hard (reject) or soft (admit and count overage).
    #[must_use]
    pub fn mode(&self) -> QuotaMode {
        self.mode
    }

    /// How many units a node reserves from the store at once.
    #[must_use]
    pub fn lease(&self) -> NonZeroU64 {
        self.lease
    }
}

/// A tenant's overrides of its plan (`[tenants.X.overrides]` in the file, or JSON with the
/// same keys in the store's directory, set with `tollgate tenants set-override`): rate,
/// burst, quotas and features, merged over the plan ([`PlanSpec::with_override`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PlanOverride {
    /// The rate instead of the plan's.
    pub rate: Option<Rate>,
    /// The burst instead of the plan's (with `rate`: else the rate's count).
    pub burst: Option<NonZeroU32>,
    /// Quotas instead of the plan's on these meters (or added).
    pub quotas: BTreeMap<MeterId, QuotaSpec>,
    /// Features added to the plan's.
    pub features: std::collections::BTreeSet<String>,
}

impl PlanOverride {
    /// Reads overrides from their JSON form (`{"rate": "100/s", "burst": 50, "quotas":
    /// {"tokens": {"limit": 500, "period": "day"}}, "features": ["sso"]}`), checked against
    /// the configuration's meters as the file's `[tenants.X.overrides]` are.
    ///
    /// # Errors
    /// What is wrong, with the key path (no line: the text is not a file).
    pub fn from_json(json: &str, config: &Config) -> Result<Self, ConfigError> {
        validate::parse_override(json, config)
    }

    /// The JSON form, as the store's directory keeps it.
    #[must_use]
    pub fn to_json(&self) -> String {
        let mut o = serde_json::Map::new();
        if let Some(r) = self.rate {
            o.insert("rate".into(), r.to_string().into());
        }
        if let Some(b) = self.burst {
            o.insert("burst".into(), b.get().into());
        }
        if !self.quotas.is_empty() {
            let quotas: serde_json::Map<String, serde_json::Value> = self
                .quotas
                .iter()
                .map(|(m, q)| {
                    let mut v = serde_json::json!({
                        "period": q.period.name(),
                        "mode": match q.mode { QuotaMode::Hard => "hard", QuotaMode::Soft => "soft" },
                        "lease": q.lease.get(),
                    });
                    // A balance's limit is its grants, not a key.
                    if q.period != Period::Prepaid {
                        v["limit"] = q.limit.get().into();
                    }
                    if let Period::Month { anchor_day } = q.period {
                        v["anchor_day"] = anchor_day.into();
                    }
                    (m.to_string(), v)
                })
                .collect();
            o.insert("quotas".into(), quotas.into());
        }
        if !self.features.is_empty() {
            o.insert("features".into(), self.features.iter().cloned().collect::<Vec<_>>().into());
        }
        serde_json::Value::Object(o).to_string()
    }

    /// Whether it changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A route rule: method and path pattern, to a meter and a cost.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub(crate) method: Option<http::Method>,
    pub(crate) pattern: RoutePattern,
    pub(crate) meter: MeterId,
    pub(crate) cost: NonZeroU32,
    pub(crate) reports: Vec<MeterId>,
    pub(crate) feature: Option<String>,
}

impl RouteSpec {
    /// The feature a tenant's plan must include for this route (else 403).
    #[must_use]
    pub fn feature(&self) -> Option<&str> {
        self.feature.as_deref()
    }

    /// The method matched, or `None` for any method.
    #[must_use]
    pub fn method(&self) -> Option<&http::Method> {
        self.method.as_ref()
    }

    /// The path pattern as written.
    #[must_use]
    pub fn path(&self) -> &str {
        self.pattern.as_str()
    }

    /// The meter charged.
    #[must_use]
    pub fn meter(&self) -> &MeterId {
        &self.meter
    }

    /// Units charged (and rate cells spent) per request.
    #[must_use]
    pub fn cost(&self) -> NonZeroU32 {
        self.cost
    }

    /// The meters the route's handler reports (through `TenantContext::record`), besides the
    /// meter it charges: a hard quota on one of them, once spent, rejects the route's requests.
    #[must_use]
    pub fn reports(&self) -> &[MeterId] {
        &self.reports
    }
}

/// A tenant declared in the file (for development and small deployments).
#[derive(Clone)]
pub struct TenantSpec {
    pub(crate) id: TenantId,
    pub(crate) plan: PlanId,
    pub(crate) key_hashes: Vec<crate::base::KeyHash>,
    pub(crate) stripe_customer: Option<String>,
    pub(crate) metronome_customer: Option<String>,
    pub(crate) overrides: Option<PlanOverride>,
}

impl std::fmt::Debug for TenantSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSpec")
            .field("id", &self.id)
            .field("plan", &self.plan)
            .field("keys", &self.key_hashes.len())
            .finish_non_exhaustive()
    }
}

impl TenantSpec {
    /// The tenant's identifier.
    #[must_use]
    pub fn id(&self) -> &TenantId {
        &self.id
    }

    /// The tenant's plan.
    #[must_use]
    pub fn plan(&self) -> &PlanId {
        &self.plan
    }

    /// The SHA-256 hashes of the tenant's API keys (keys are never kept in clear).
    #[must_use]
    pub fn key_hashes(&self) -> &[crate::base::KeyHash] {
        &self.key_hashes
    }

    /// The tenant's Stripe customer id, if declared.
    #[must_use]
    pub fn stripe_customer(&self) -> Option<&str> {
        self.stripe_customer.as_deref()
    }

    /// The tenant's Metronome customer id or ingest alias, if declared.
    #[must_use]
    pub fn metronome_customer(&self) -> Option<&str> {
        self.metronome_customer.as_deref()
    }

    /// The tenant's overrides of its plan, if declared.
    #[must_use]
    pub fn overrides(&self) -> Option<&PlanOverride> {
        self.overrides.as_ref()
    }
}

impl Config {
    /// Reads and validates the TOML file at `path`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, line, column and key of the first problem.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(ConfigErrorKind::Io, "", format!("cannot read the file: {e}"))
                .in_file(Some(path.to_owned()))
        })?;
        let mut config = validate::parse(&text).map_err(|e| e.in_file(Some(path.to_owned())))?;
        config.file = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates a TOML document.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the line, column and key of the first problem.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        validate::parse(text)
    }

    /// How tenants are identified.
    pub fn identify(&self) -> &Identify {
        &self.identify
    }

    /// What a request with a missing or unknown tenant gets.
    pub fn on_unknown(&self) -> &OnUnknown {
        &self.on_unknown
    }

    /// Memory bounds and header style.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Usage aggregation, flushing and billing settings.
    pub fn usage(&self) -> &UsageSettings {
        &self.usage
    }

    /// The declared meters (`requests` always exists).
    pub fn meters(&self) -> &[MeterSpec] {
        &self.meters
    }

    /// The meter charged by requests that match no route.
    pub fn default_meter(&self) -> &MeterId {
        &self.default_meter
    }

    /// The plans, by name.
    pub fn plans(&self) -> &BTreeMap<PlanId, PlanSpec> {
        &self.plans
    }

    /// One plan by name.
    pub fn plan(&self, id: &PlanId) -> Option<&PlanSpec> {
        self.plans.get(id)
    }

    /// Whether `plan` with the overrides `o` merged over it holds as a plan must: every
    /// route's cost within its burst, and each hard quota on a meter that requests are
    /// charged, a route reports or events record.
    ///
    /// # Errors
    /// What does not hold.
    pub fn check_override(&self, plan: &PlanId, o: &PlanOverride) -> Result<(), String> {
        let Some(base) = self.plans.get(plan) else {
            return Err(format!("no plan `{plan}`"));
        };
        let merged = base.with_override(o);
        if o.burst.is_some() && merged.rate.is_none() {
            return Err("a burst needs a rate (the plan has none, and the overrides set none)".into());
        }
        if merged.rate.is_some() {
            if let Some(r) = self.routes.iter().find(|r| r.cost > merged.burst) {
                return Err(format!(
                    "the route {} costs {} and the overridden burst is {}: no request could ever pass",
                    r.path(),
                    r.cost,
                    merged.burst
                ));
            }
        }
        for (meter, q) in &merged.quotas {
            let enforced = *meter == self.default_meter
                || self.routes.iter().any(|r| r.meter == *meter || r.reports.contains(meter))
                || self.events.products.values().any(|m| m == meter);
            if q.mode == QuotaMode::Hard && !enforced {
                return Err(format!(
                    "a hard quota on `{meter}`, but no route charges or reports it and no event product records it"
                ));
            }
        }
        Ok(())
    }

    /// The route rules, in the order they are matched (the first match wins).
    pub fn routes(&self) -> &[RouteSpec] {
        &self.routes
    }

    /// The tenants declared in the file.
    pub fn tenants(&self) -> &[TenantSpec] {
        &self.tenants
    }

    /// Whether `meter`'s usage is exported: `[meters.X] export`, `true` for a meter the
    /// configuration does not declare.
    #[must_use]
    pub fn exports_meter(&self, meter: &MeterId) -> bool {
        self.meters.iter().find(|m| &m.id == meter).is_none_or(MeterSpec::exported)
    }

    /// How closed windows are exported (`[export]`).
    pub fn export(&self) -> &ExportSettings {
        &self.export
    }

    /// How client addresses are read for anonymous callers.
    pub fn clients(&self) -> &ClientSettings {
        &self.clients
    }

    /// How usage events from jobs and queues are taken (`[events]`).
    pub fn events(&self) -> &EventSettings {
        &self.events
    }

    /// Stripe's settings, if the file has a `[stripe]` section.
    pub fn stripe(&self) -> Option<&StripeSettings> {
        self.stripe.as_ref()
    }

    /// Whether the sink the configuration names needs a billing customer (Stripe and
    /// Metronome do; a file does not), for an engine built without a sink.
    pub(crate) fn sink_needs_customer(&self) -> bool {
        matches!(self.export.sink_kind(self.stripe.is_some()), Some(SinkKind::Stripe | SinkKind::Metronome))
    }

    /// `[metronome]`, if present.
    #[must_use]
    pub fn metronome(&self) -> Option<&MetronomeSettings> {
        self.metronome.as_ref()
    }

    /// The file the configuration was read from, if any.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// The store the configuration names (`[store]`; SQLite in `tollgate.db` without one).
    pub fn store(&self) -> &StoreSettings {
        &self.store
    }

    /// The store of `role`: its own section (`[store.directory]`, …) if the file has one, else
    /// `[store]`'s.
    ///
    /// ```
    /// use tollgate::config::{StoreRole, StoreSettings};
    /// let config = tollgate::Config::from_toml_str(
    ///     "[store]\nkind = \"memory\"\n[store.directory]\nkind = \"sqlite\"\npath = \"directory.db\"\n",
    /// )
    /// .unwrap();
    /// assert!(matches!(config.store_of(StoreRole::Directory), StoreSettings::Sqlite { .. }));
    /// assert_eq!(config.store_of(StoreRole::Quota), &StoreSettings::Memory);
    /// ```
    pub fn store_of(&self, role: StoreRole) -> &StoreSettings {
        self.store_roles.get(role).unwrap_or(&self.store)
    }

    /// Whether the file has a `[store]` section.
    pub fn names_store(&self) -> bool {
        self.store_written.is_some()
    }

    /// Refuses `next` as a reload of `self` when it names another store: the running store
    /// stays. The error names the file, line and key that changed.
    pub(crate) fn check_same_store(&self, next: &Config) -> Result<(), ConfigError> {
        if self.store == next.store {
            // A role's own store cannot change either.
            let Some(role) = StoreRole::ALL.into_iter().find(|r| self.store_roles.get(*r) != next.store_roles.get(*r))
            else {
                return Ok(());
            };
            let origin = next.store_written.as_ref();
            let position = origin.and_then(|o| o.keys.get(role.name()).copied().or(o.section));
            return Err(ConfigError::new(
                ConfigErrorKind::Conflict,
                format!("store.{}", role.name()),
                format!(
                    "the store of the {} role cannot change while the service runs (it is {}, the new file \
                     says {}): the reload is refused and the running stores stay; restart to use another store",
                    role.name(),
                    self.store_of(role),
                    next.store_of(role)
                ),
            )
            .at(position)
            .in_file(next.file.clone()));
        }
        let key = match (&self.store, &next.store) {
            (StoreSettings::Sqlite { path: a, .. }, StoreSettings::Sqlite { path: b, .. }) if a != b => "path",
            (StoreSettings::Sqlite { .. }, StoreSettings::Sqlite { .. }) => "synchronous",
            (StoreSettings::Dynamodb { table: a, .. }, StoreSettings::Dynamodb { table: b, .. }) if a != b => "table",
            (StoreSettings::Dynamodb { .. }, StoreSettings::Dynamodb { .. }) => "endpoint",
            (StoreSettings::Postgres(a), StoreSettings::Postgres(b)) => {
                if a.url != b.url {
                    "url"
                } else if a.schema != b.schema {
                    "schema"
                } else if a.pool_size != b.pool_size {
                    "pool_size"
                } else if a.statement_timeout != b.statement_timeout {
                    "statement_timeout"
                } else if a.migrate != b.migrate {
                    "migrate"
                } else {
                    "ca_file"
                }
            }
            _ => "kind",
        };
        let origin = next.store_written.as_ref();
        let position = origin.and_then(|o| o.keys.get(key).copied().or(o.section));
        Err(ConfigError::new(
            ConfigErrorKind::Conflict,
            format!("store.{key}"),
            format!(
                "the store cannot change while the service runs (it is {}, the new file says {}): \
                 the reload is refused and the running store stays; restart to use another store",
                self.store, next.store
            ),
        )
        .at(position)
        .in_file(next.file.clone()))
    }
}
