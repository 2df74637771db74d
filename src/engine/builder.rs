use std::sync::Arc;

use crate::engine::table::TenantTable;
use tokio::sync::{mpsc, watch};

use super::Worker;
use crate::engine::{
    admit::{
        clients::KeyLookups,
        gate::{Gate, GateParts},
        idempotency::Idempotency,
    },
    alerts::{AlertQueue, Alerts},
    engine::{Engine, Tollgate},
    export::exporter::Exporter,
    node::NodeIds,
    recharge::Recharges,
    shared::{Shared, SharedParts},
    store_calls::StoreCalls,
    usage::{
        events::EventRecorder,
        flush::Pipeline,
        held::OpenHolds,
        lease::Leases,
        taken::Prefetcher,
        thresholds::{ThresholdCrossed, ThresholdHook, Thresholds},
        units::Units,
    },
};
use crate::{
    billing::BillingSink,
    clock::Clock,
    config::{Config, StoreRole, StoreSettings},
    metrics::{Metrics, Totals},
    plan::Runtime,
    store::{
        AuditStore, DirectoryStore, IdempotencyStore, MemoryStore, OutboxStore, PlaceStore, QuotaStore, RateStore,
        Roles, Store, UsageExportStore,
    },
};

/// Why [`Builder::open`] could not build an engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The store named by the configuration could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[source] crate::store::StoreError),
    /// The configuration names, for a role, a store that does not serve it (the
    /// configuration refuses it at load: a configuration built in code may not).
    #[error("the {role} role cannot be kept on a {kind} store (docs/redis.md)")]
    NotServed {
        /// The store kind.
        kind: &'static str,
        /// The role.
        role: &'static str,
    },
    /// The configuration names a store whose cargo feature is not compiled in.
    #[error(
        "the store kind \"{kind}\" (`[store] kind`; \"sqlite\" without a [store] section) needs tollgate's \
         cargo feature `{feature}`, which this build does not have: enable it (features = [\"{feature}\"]) \
         or choose another kind"
    )]
    MissingFeature {
        /// The store kind.
        kind: &'static str,
        /// The cargo feature it needs.
        feature: &'static str,
    },
}

/// Opens the store `settings` name.
pub(crate) async fn open_store(settings: &StoreSettings) -> Result<Opened, BuildError> {
    #[cfg(feature = "redis")]
    if let StoreSettings::Redis(r) = settings {
        let url = match &r.url {
            Some(url) => url.clone(),
            None => std::env::var("REDIS_URL").map_err(|_| {
                BuildError::Store(crate::store::StoreError::Backend(
                    "kind = \"redis\" without `url` reads REDIS_URL, which is not set".into(),
                ))
            })?,
        };
        let mut options = crate::store::RedisOptions::new(REDIS_TIMEOUT).cluster(r.cluster);
        options.accept_eviction.clone_from(&r.accept_eviction);
        let options = options.wait_for_replicas(r.wait_replicas, r.wait_timeout);
        let store = crate::store::RedisStore::open_with(&url, &r.prefix, &options).await.map_err(BuildError::Store)?;
        return Ok(Opened::Redis(Arc::new(store)));
    }
    open_whole(settings).await.map(Opened::Whole)
}

/// How long connecting to a Redis server, and each command, may take (the engine bounds the
/// calls of each path tighter).
#[cfg(feature = "redis")]
const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the store of every role `settings` name.
async fn open_whole(settings: &StoreSettings) -> Result<Arc<dyn Store>, BuildError> {
    match settings {
        StoreSettings::Memory => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "sqlite")]
        StoreSettings::Sqlite { path, synchronous } => {
            let store = crate::store::SqliteStore::open_with(path.clone(), *synchronous).await;
            Ok(Arc::new(store.map_err(BuildError::Store)?))
        }
        #[cfg(feature = "dynamodb")]
        StoreSettings::Dynamodb { table, endpoint } => {
            let store = crate::store::DynamoStore::from_env(table.clone(), endpoint.as_deref()).await;
            store.check_table().await.map_err(BuildError::Store)?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "postgres")]
        StoreSettings::Postgres(p) => {
            let options = crate::store::PostgresStore::options_of(p).map_err(BuildError::Store)?;
            let store = crate::store::PostgresStore::open(&options).await.map_err(BuildError::Store)?;
            Ok(Arc::new(store))
        }
        #[allow(unreachable_patterns)]
        other => Err(BuildError::MissingFeature { kind: other.kind(), feature: other.feature().unwrap_or_default() }),
    }
}

/// A store opened for some roles: one of every role, or one of the roles a Redis server
/// serves.
#[derive(Debug, Clone)]
pub(crate) enum Opened {
    /// A store of every role.
    Whole(Arc<dyn Store>),
    /// A Redis store: quota, rate, places and idempotency.
    #[cfg(feature = "redis")]
    Redis(Arc<crate::store::RedisStore>),
}

/// Each role of an opened store, as the engine holds it: `None` when the store does not serve
/// it (the configuration refuses such a store at load).
macro_rules! role_of {
    ($name:ident, $trait:path, $redis:expr) => {
        pub(crate) fn $name(&self) -> Option<Arc<dyn $trait>> {
            match self {
                Opened::Whole(s) => Some(s.clone()),
                #[cfg(feature = "redis")]
                #[allow(clippy::redundant_closure_call)]
                Opened::Redis(r) => ($redis)(r.clone()),
            }
        }
    };
}

impl Opened {
    role_of!(quota, QuotaStore, |r| Some(r as Arc<dyn QuotaStore>));
    role_of!(usage, UsageExportStore, |_| None);
    role_of!(directory, DirectoryStore, |_| None);
    role_of!(alerts, OutboxStore, |_| None);
    role_of!(audit, AuditStore, |_| None);
    role_of!(idempotency, IdempotencyStore, |r| Some(r as Arc<dyn IdempotencyStore>));
    role_of!(rate, RateStore, |r| Some(r as Arc<dyn RateStore>));
    role_of!(places, PlaceStore, |r| Some(r as Arc<dyn PlaceStore>));
}

/// Opens the stores a configuration names, one per distinct setting: the store of each role
/// (`[store]`'s, or a role's own section), a setting named by several roles opened once.
#[derive(Debug, Default)]
pub(crate) struct OpenStores {
    opened: Vec<(StoreSettings, Opened)>,
}

impl OpenStores {
    /// The store of `role` in `config` as the role is served, or a [`BuildError::NotServed`]
    /// (a configuration refuses it at load).
    pub(crate) async fn serving<T: ?Sized>(
        &mut self,
        config: &Config,
        role: StoreRole,
        of: impl FnOnce(&Opened) -> Option<Arc<T>>,
    ) -> Result<Arc<T>, BuildError> {
        let opened = self.role(config, role).await?;
        of(&opened).ok_or(BuildError::NotServed { kind: config.store_of(role).kind(), role: role.name() })
    }

    /// The store of `role` in `config`, opened if no role opened it yet: a SQLite file is the
    /// same store however its path is spelled (`./`, `..`, relative or absolute, a link).
    pub(crate) async fn role(&mut self, config: &Config, role: StoreRole) -> Result<Opened, BuildError> {
        let settings = config.store_of(role);
        let wanted = identity(settings);
        if let Some((opened, store)) = self.opened.iter().find(|(s, _)| identity(s) == wanted) {
            if let (StoreSettings::Sqlite { synchronous: first, .. }, StoreSettings::Sqlite { synchronous, .. }) =
                (opened, settings)
            {
                if first != synchronous {
                    tracing::warn!(
                        role = role.name(),
                        "the role names a SQLite file another role opened \
                        with another `synchronous`: it shares that store, opened with the first role's"
                    );
                }
            }
            return Ok(store.clone());
        }
        let store = open_store(settings).await?;
        self.opened.push((settings.clone(), store.clone()));
        Ok(store)
    }
}

/// What makes two store settings the same store: a SQLite file by where it is, not by how
/// its path is spelled or its `synchronous` setting.
fn identity(settings: &StoreSettings) -> StoreSettings {
    match settings {
        StoreSettings::Sqlite { path, .. } => {
            StoreSettings::Sqlite { path: file_identity(path), synchronous: crate::config::Synchronous::Full }
        }
        other => other.clone(),
    }
}

/// The file's canonical path; for a file not there yet, its folder's and its name.
fn file_identity(path: &std::path::Path) -> std::path::PathBuf {
    if let Ok(canonical) = path.canonicalize() {
        return canonical;
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    match (folder.canonicalize(), path.file_name()) {
        (Ok(folder), Some(name)) => folder.join(name),
        _ => path.to_path_buf(),
    }
}

/// How many lease refills may wait for the worker; past that, requests refill themselves.
const PREFETCH_QUEUE: usize = 1024;

/// Builds a [`Tollgate`] engine and its [`Worker`]; each front door then wraps the engine
/// (for tower: [`TollgateLayer::new`](crate::TollgateLayer::new)).
///
/// Two ways to finish: [`open`](Self::open), async and fallible, which opens the store the
/// configuration names (`[store]`: a SQLite file by default, memory, a DynamoDB table) unless
/// one was given in code; and [`build`](Self::build), infallible, for a store given in code
/// (or memory).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let config = tollgate::Config::from_toml_str(r#"
///     [store]
///     kind = "memory"
///
///     [plans.free]
///     rate = "10/s"
/// "#).unwrap();
/// let (tollgate, worker) = tollgate::Tollgate::builder(config).open().await.unwrap();
/// tokio::spawn(worker.run());
/// let layer = tollgate::TollgateLayer::new(tollgate.clone());
/// // ... serve requests through `layer` ...
/// tollgate.shutdown().await.unwrap();
/// # }
/// ```
#[must_use]
pub struct Builder {
    config: Config,
    store: Option<Arc<dyn Store>>,
    quota: Option<Arc<dyn QuotaStore>>,
    usage: Option<Arc<dyn UsageExportStore>>,
    directory: Option<Arc<dyn DirectoryStore>>,
    idempotency: Option<Arc<dyn IdempotencyStore>>,
    rate: Option<Arc<dyn RateStore>>,
    places: Option<Arc<dyn PlaceStore>>,
    alerts: Option<Arc<dyn OutboxStore>>,
    audit: Option<Arc<dyn AuditStore>>,
    sink: Option<Arc<dyn BillingSink>>,
    clock: Option<Clock>,
    /// Whether `store` was opened from the configuration.
    configured: bool,
    on_threshold: Option<ThresholdHook>,
    /// What charges recharges; `None`: built from `[stripe]` when a plan recharges.
    recharge_charger: Option<Arc<crate::billing::Charger>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("store", &self.store)
            .field("quota", &self.quota)
            .field("usage", &self.usage)
            .field("directory", &self.directory)
            .field("idempotency", &self.idempotency)
            .field("rate", &self.rate)
            .field("places", &self.places)
            .field("alerts", &self.alerts)
            .field("audit", &self.audit)
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl Tollgate {
    /// Starts building an engine from a configuration. Without a store given in code,
    /// [`open`](Builder::open) opens the one the configuration names; without a billing sink
    /// closed windows stay unexported in the store.
    pub fn builder(config: Config) -> Builder {
        Builder {
            config,
            store: None,
            quota: None,
            usage: None,
            directory: None,
            idempotency: None,
            rate: None,
            places: None,
            alerts: None,
            audit: None,
            sink: None,
            clock: None,
            configured: false,
            on_threshold: None,
            recharge_charger: None,
        }
    }
}

impl Builder {
    /// The store for every role (counters, usage and its export, the tenant directory,
    /// `Idempotency-Key` bindings) that is not given a store of its own.
    pub fn store(self, store: impl Store) -> Self {
        self.store_arc(Arc::new(store))
    }

    /// The store for every role, already shared.
    pub fn store_arc(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The store of the quota role (the counters leases are reserved from), instead of
    /// [`store`](Self::store)'s.
    ///
    /// Any store shared as an `Arc` serves several roles: pass a clone of it to each.
    pub fn quota_store(mut self, store: Arc<dyn QuotaStore>) -> Self {
        self.quota = Some(store);
        self
    }

    /// The store of the usage, export and ledger roles, which share writes, instead of
    /// [`store`](Self::store)'s.
    pub fn usage_store(mut self, store: Arc<dyn UsageExportStore>) -> Self {
        self.usage = Some(store);
        self
    }

    /// The store of the directory role (tenants, keys, plans, customers, overrides), instead
    /// of [`store`](Self::store)'s: for example a directory kept in the team's own database
    /// while quotas live in DynamoDB.
    ///
    /// The exporter reads each tenant's billing customer from it, once per tenant and pass.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tollgate::{store::MemoryStore, Config, Tollgate};
    /// # let config = Config::from_toml_str("[plans.free]\nrate = \"10/s\"").unwrap();
    /// let directory = Arc::new(MemoryStore::new()); // the team's own directory
    /// let (engine, _worker) = Tollgate::builder(config)
    ///     .store(MemoryStore::new()) // every other role
    ///     .directory_store(directory)
    ///     .build();
    /// # let _ = engine;
    /// ```
    pub fn directory_store(mut self, store: Arc<dyn DirectoryStore>) -> Self {
        self.directory = Some(store);
        self
    }

    /// The store of the idempotency role (`Idempotency-Key` bindings), instead of
    /// [`store`](Self::store)'s.
    pub fn idempotency_store(mut self, store: Arc<dyn IdempotencyStore>) -> Self {
        self.idempotency = Some(store);
        self
    }

    /// The store of the rate role (tenants' shared rates, `rate_scope = "fleet"`), instead of
    /// [`store`](Self::store)'s. (From the configuration, `[store.rate]`, else the quota role's
    /// store.)
    pub fn rate_store(mut self, store: Arc<dyn RateStore>) -> Self {
        self.rate = Some(store);
        self
    }

    /// The store of the places role (tenants' requests in flight across the fleet,
    /// `concurrency_scope = "fleet"`), instead of [`store`](Self::store)'s. (From the
    /// configuration, `[store.places]`, else the quota role's store.)
    pub fn places_store(mut self, store: Arc<dyn PlaceStore>) -> Self {
        self.places = Some(store);
        self
    }

    /// The store of the alerts role (the outbox of alerts to deliver, `[alerts]`), instead of
    /// [`store`](Self::store)'s. (From the configuration, `[store.alerts]`, else the usage
    /// role's store.)
    pub fn alerts_store(mut self, store: Arc<dyn OutboxStore>) -> Self {
        self.alerts = Some(store);
        self
    }

    /// The store of the audit of tenants' settings ([`AuditStore`]), instead of
    /// [`store`](Self::store)'s. (From the configuration, the directory role's store: the
    /// audit is kept beside the tenants.) Give it with a
    /// [`directory_store`](Self::directory_store) of your own, or its records are kept in
    /// memory.
    pub fn audit_store(mut self, store: Arc<dyn AuditStore>) -> Self {
        self.audit = Some(store);
        self
    }

    /// Whether some role has no store given in code (the rate and places roles aside: code that gives
    /// the other four keeps its stores, and its fleet rates are each node's unless it gives
    /// [`rate_store`](Self::rate_store) too).
    fn lacks_a_store(&self) -> bool {
        self.store.is_none()
            && (self.quota.is_none() || self.usage.is_none() || self.directory.is_none() || self.idempotency.is_none())
    }

    /// What charges auto-recharges of prepaid balances (`[plans.X.recharge.METER]`). Without
    /// it, one is built from `[stripe]` (its secret key, `api_base` and `timeout`) when a plan
    /// recharges; no secret key is logged as an error, and claimed recharges wait for one.
    #[cfg(feature = "stripe")]
    #[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
    pub fn recharge_charger(mut self, charger: crate::billing::RechargeCharger) -> Self {
        self.recharge_charger = Some(Arc::new(charger));
        self
    }

    /// Where closed usage windows are exported.
    pub fn billing_sink(mut self, sink: impl BillingSink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// [`billing_sink`](Self::billing_sink), shared: a sink chosen at run time.
    pub fn billing_sink_arc(mut self, sink: Arc<dyn BillingSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Called when a tenant crosses a threshold of a quota (`usage.notify_at`, 80% and 100%
    /// of the limit by default): once per threshold, quota and period on this node (so at
    /// most once per node across a fleet). Called on the path that refills the tenant's
    /// lease: keep it quick (send to a channel, spawn a task).
    ///
    /// ```
    /// # let config = tollgate::Config::from_toml_str("[plans.p]\nquotas.requests = { limit = 10, period = \"day\" }").unwrap();
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let (engine, _worker) = tollgate::Tollgate::builder(config)
    ///     .on_threshold(move |crossed: &tollgate::report::ThresholdCrossed| {
    ///         let _ = tx.send((crossed.tenant.clone(), crossed.meter.clone(), crossed.percent));
    ///     })
    ///     .build();
    /// # let _ = (engine, rx.try_recv());
    /// ```
    pub fn on_threshold(mut self, hook: impl Fn(&ThresholdCrossed) + Send + Sync + 'static) -> Self {
        self.on_threshold = Some(Arc::new(hook));
        self
    }

    /// The clock (the system clock by default; [`Clock::fake`] in tests).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Opens the store the configuration names (unless one was given in code) and builds the
    /// engine: the async, fallible way, for everything a deployment configures outside code.
    ///
    /// Without a `[store]` section that is SQLite in `tollgate.db` in the working directory. A
    /// role with a section of its own (`[store.directory]`, …) gets that store; stores named
    /// alike are opened once. Roles given a store in code keep it.
    ///
    /// # Errors
    /// A [`BuildError`]: the store could not be opened (a damaged or foreign file, a file of a
    /// newer tollgate), or its kind needs a cargo feature this build does not have.
    pub async fn open(mut self) -> Result<(Tollgate, Worker), BuildError> {
        if self.lacks_a_store() {
            // The audit is kept beside the directory: with a directory given in code, its
            // audit is given in code too (or kept in memory, with a warning).
            let directory_given = self.directory.is_some();
            let mut open = OpenStores::default();
            let config = &self.config;
            if self.quota.is_none() {
                self.quota = Some(open.serving(config, StoreRole::Quota, Opened::quota).await?);
            }
            if self.usage.is_none() {
                self.usage = Some(open.serving(config, StoreRole::Usage, Opened::usage).await?);
            }
            if self.directory.is_none() {
                self.directory = Some(open.serving(config, StoreRole::Directory, Opened::directory).await?);
            }
            if self.idempotency.is_none() {
                self.idempotency = Some(open.serving(config, StoreRole::Idempotency, Opened::idempotency).await?);
            }
            if self.rate.is_none() {
                self.rate = Some(open.serving(config, StoreRole::Rate, Opened::rate).await?);
            }
            if self.places.is_none() {
                self.places = Some(open.serving(config, StoreRole::Places, Opened::places).await?);
            }
            if self.alerts.is_none() {
                self.alerts = Some(open.serving(config, StoreRole::Alerts, Opened::alerts).await?);
            }
            if self.audit.is_none() && !directory_given {
                self.audit = Some(open.serving(config, StoreRole::Directory, Opened::audit).await?);
            }
            self.configured = true;
        }
        Ok(self.build())
    }

    /// Builds the engine with the store given in code, or a [`MemoryStore`] if none was: it
    /// does not open the store the configuration names (that is [`open`](Self::open)).
    /// Returns the engine and the [`Worker`] to spawn.
    pub fn build(self) -> (Tollgate, Worker) {
        if let Some(sink) = self.sink.as_ref().filter(|s| !s.reads_back()) {
            if !self.config.export.reconcile_interval.is_zero() {
                tracing::warn!(
                    sink = ?sink,
                    "the billing sink cannot be read back, so it is not reconciled: the worker's reconciliation \
                     compares nothing (export.reconcile_interval = \"0s\" says so in the configuration)"
                );
            }
        }
        if self.config.names_store() {
            // Each role left without a store in code is kept in memory: say so for each one
            // the file gives a durable store.
            let given = [
                (StoreRole::Quota, self.quota.is_some()),
                (StoreRole::Usage, self.usage.is_some()),
                (StoreRole::Directory, self.directory.is_some()),
                (StoreRole::Idempotency, self.idempotency.is_some()),
                (StoreRole::Rate, self.rate.is_some()),
                (StoreRole::Places, self.places.is_some()),
                (StoreRole::Alerts, self.alerts.is_some()),
            ];
            for (role, given) in given {
                let configured = self.config.store_of(role);
                if self.store.is_none() && !given && configured != &StoreSettings::Memory {
                    tracing::warn!(
                        role = role.name(),
                        kind = configured.kind(),
                        "the configuration names a durable store for this role but Builder::build() was called \
                         without one: its state is kept in memory only; call Builder::open().await to open the \
                         configured stores"
                    );
                }
            }
        }
        let metrics = Arc::new(Metrics::register());
        let limits = self.config.limits.clone();
        let clock = self.clock.unwrap_or_default();
        let fleet_rate = self.config.plans().values().any(|p| p.rate_scope() == crate::config::Scope::Fleet);
        let fleet_places = self.config.plans().values().any(|p| p.concurrency_scope() == crate::config::Scope::Fleet);
        if self.store.is_none() && ((self.rate.is_none() && fleet_rate) || (self.places.is_none() && fleet_places)) {
            tracing::warn!(
                "a plan keeps its rate or concurrency for the fleet (rate_scope, concurrency_scope = \"fleet\") but \
                 its role has no store: it is kept in this process's memory, so each node keeps its own; give \
                 Builder::rate_store and Builder::places_store (or open the configured stores with Builder::open)"
            );
        }
        let runtime = Runtime::compile(self.config, &metrics, &clock);
        let (prefetch_tx, prefetch_rx) = mpsc::channel(PREFETCH_QUEUE);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        if self.store.is_none() && self.directory.is_some() && self.audit.is_none() {
            tracing::warn!(
                "a directory store was given without an audit store: the audit of tenants' settings is kept in \
                 this process's memory; give Builder::audit_store"
            );
        }
        let all: Arc<dyn Store> = match self.store {
            Some(store) => store,
            // One memory store for every role not given one.
            None => Arc::new(MemoryStore::new()),
        };
        let roles = Roles {
            quota: self.quota.unwrap_or_else(|| all.clone()),
            usage: self.usage.unwrap_or_else(|| all.clone()),
            directory: self.directory.unwrap_or_else(|| all.clone()),
            idempotency: self.idempotency.unwrap_or_else(|| all.clone()),
            rate: self.rate.unwrap_or_else(|| all.clone()),
            places: self.places.unwrap_or_else(|| all.clone()),
            alerts: self.alerts.unwrap_or_else(|| all.clone()),
            audit: self.audit.unwrap_or(all),
        };
        let totals = Arc::new(Totals::register());
        let stores = Arc::new(StoreCalls::new(roles, totals.clone(), clock.clone(), &runtime.config));
        let ids = Arc::new(NodeIds::new());
        let queue = Arc::new(AlertQueue::default());
        let recharges = Arc::new(Recharges::default());
        if let Some(charger) = self.recharge_charger.clone().or_else(|| recharge_charger_of(&runtime.config)) {
            recharges.charge_with(charger);
        }
        let leases = Arc::new(Leases::new(
            stores.clone(),
            ids.clone(),
            Thresholds::new(self.on_threshold, queue.clone()),
            recharges.clone(),
            clock.clone(),
            &runtime.config,
        ));
        let needs_customer = self.sink.as_ref().map(|s| s.needs_customer());
        let customer_field =
            self.sink.as_ref().map_or_else(|| customer_field_of(&runtime.config), |s| s.customer_field());
        let pipeline = Pipeline::new(stores.clone(), totals.clone(), clock.clone(), needs_customer);
        let exporter =
            Exporter::new(self.sink, stores.clone(), ids.clone(), clock.clone(), metrics.clone(), totals.clone());
        let holds = Arc::new(OpenHolds::default());
        let prefetcher = Prefetcher::new(prefetch_tx);
        let events =
            EventRecorder::new(stores.clone(), metrics.clone(), totals.clone(), holds.clone(), prefetcher.clone());
        let table = Arc::new(TenantTable::new(limits.max_tenants, metrics.rate_states_dropped.clone()));
        let shared = Arc::new(Shared::new(SharedParts {
            runtime,
            stores,
            ids,
            clock,
            metrics,
            totals,
            store_configured: self.configured,
            shutdown: shutdown_tx,
        }));
        let units = Arc::new(Units::new(shared.clone(), leases, pipeline, events, holds, prefetcher));
        let gate = Gate::new(
            shared.clone(),
            units.clone(),
            GateParts {
                table,
                idempotency: Idempotency::new(limits.idempotency_window, limits.idempotency_capacity),
                unknown: crate::tenant::lru(limits.negative_capacity).time_to_live(limits.negative_ttl).build(),
                key_lookups: KeyLookups::new(limits.max_clients),
                customer_field,
            },
        );
        let alerts = Alerts::new(shared.clone(), queue);
        let tollgate = Tollgate::from_parts(Engine { shared, gate, units, exporter, alerts, recharges });
        let worker = Worker::new(tollgate.clone(), prefetch_rx, shutdown_rx);
        (tollgate, worker)
    }
}

/// The billing customer the configuration's sink bills (without a sink given in code).
fn customer_field_of(config: &Config) -> crate::base::CustomerField {
    config.export.sink.map(crate::base::SinkKind::customer_field).unwrap_or_default()
}

#[cfg(feature = "stripe")]
#[cfg_attr(docsrs, doc(cfg(feature = "stripe")))]
impl Tollgate {
    /// A Stripe webhook handler for the tenants of this engine's directory, verifying with any
    /// of `secrets`: plan changes apply at once on this node (the engine forgets the tenant),
    /// within `limits.directory_ttl` on the others. Its store calls are this engine's
    /// background calls (`limits.background_timeout`).
    #[must_use]
    pub fn webhook_handler_with_secrets(&self, secrets: Vec<crate::billing::Secret>) -> crate::billing::WebhookHandler {
        let config = self.clone();
        let stores = self.shared().stores();
        crate::billing::WebhookHandler::calling(
            stores.policy().clone(),
            stores.given().directory.clone(),
            Arc::new(self.clone()),
            move || config.config(),
            self.shared().clock().clone(),
            secrets,
        )
        .with_quota(stores.given().quota.clone())
        .with_audit(stores.given().audit.clone())
        .with_usage(stores.given().usage.clone())
    }

    /// A Stripe webhook handler as the configuration sets it up: the signing secrets of
    /// `stripe.webhook_secret_file`, or of `STRIPE_WEBHOOK_SECRET` (comma-separated); the
    /// secret key (`stripe.secret_key_file` or `STRIPE_SECRET_KEY`), when there is one, to read
    /// what payments' events lack; the event destination of Stripe's meter errors, if
    /// configured.
    ///
    /// # Errors
    /// No signing secret, a file that cannot be read, or a `[stripe.credits]` price named by a
    /// lookup key without a secret key.
    pub fn webhook_handler(&self) -> Result<crate::billing::WebhookHandler, crate::billing::StripeSetupError> {
        use crate::billing::{read_secrets, StripeSetupError};
        let config = self.config();
        let file = config.stripe().and_then(|s| s.webhook_secret_file.as_deref());
        let secrets = read_secrets(file, "STRIPE_WEBHOOK_SECRET", "webhook_secret_file")?;
        let mut handler = self.webhook_handler_with_secrets(secrets);
        let Some(stripe) = config.stripe() else { return Ok(handler) };
        // The secret key reads what payments' events lack, when there is one.
        let key = read_secrets(stripe.secret_key_file.as_deref(), "STRIPE_SECRET_KEY", "secret_key_file")
            .ok()
            .and_then(|k| k.into_iter().next());
        if let Some(key) = key.clone() {
            handler = handler.with_api_key(key, stripe.api_base.as_deref(), stripe.timeout);
            // Stripe cannot list a key's permissions: what [stripe.credits] needs is asked
            // once, in the background, and what is refused logged.
            if let (Some(credits), Some(reader)) = (&stripe.credits, handler.reader()) {
                crate::billing::probe_in_background(reader, &config, credits);
            }
        } else if let Some(lookup) =
            stripe.credits.as_ref().and_then(|c| c.prices.keys().find(|k| crate::billing::prices::is_lookup_key(k)))
        {
            return Err(StripeSetupError::LookupKeyWithoutSecretKey { key: lookup.clone() });
        } else if stripe.credits.is_some() {
            tracing::warn!(
                "[stripe.credits] without a Stripe secret key: checkout sessions without `tollgate_units` \
                metadata cannot be read for their line items, and grant nothing (logged) until one is set"
            );
        }
        // The event destination of Stripe's meter errors, if one is configured.
        let destination = match read_secrets(
            stripe.event_destination_secret_file.as_deref(),
            "STRIPE_EVENT_DESTINATION_SECRET",
            "event_destination_secret_file",
        ) {
            Ok(secrets) => secrets,
            Err(StripeSetupError::MissingSecret { .. }) => return Ok(handler),
            Err(e) => return Err(e),
        };
        // The full event is fetched with the API key, when there is one.
        Ok(handler.with_event_destination(destination, key, stripe.api_base.as_deref(), stripe.timeout))
    }
}

/// The recharge charger `[stripe]` describes, when a plan recharges (none without a secret
/// key: logged, as claimed recharges then wait).
fn recharge_charger_of(config: &Config) -> Option<Arc<crate::billing::Charger>> {
    if config.plans().values().all(|p| p.recharges().next().is_none()) {
        return None;
    }
    #[cfg(feature = "stripe")]
    match crate::billing::RechargeCharger::from_config(config) {
        Ok(charger) => return Some(Arc::new(charger)),
        Err(e) => tracing::error!(error = %e,
            "a plan recharges prepaid balances, but no Stripe charger could be set up: recharges are claimed and wait"),
    }
    #[cfg(not(feature = "stripe"))]
    tracing::error!("a plan recharges prepaid balances, but this build has no `stripe` feature: nothing is charged");
    None
}
