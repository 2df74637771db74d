use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};

use super::{engine::Shared, flush::Pipeline, idempotency::Idempotency, table::TenantTable, Tollgate};
use crate::{
    billing::BillingSink,
    clock::Clock,
    config::Config,
    metrics::{Metrics, Totals},
    plan::Runtime,
    store::{MemoryStore, Store},
    tenant::Fingerprinter,
    worker::Worker,
};

/// Why [`Builder::open`] could not build an engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The store named by the configuration could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[source] crate::store::StoreError),
}

/// How many lease refills may wait for the worker; past that, requests refill themselves.
const PREFETCH_QUEUE: usize = 1024;

/// Builds a [`Tollgate`] engine and its [`Worker`]; each front door then wraps the engine
/// (for tower: [`TollgateLayer::new`](crate::TollgateLayer::new)).
///
/// Two ways to finish: [`build`](Self::build), infallible, for stores given in code, and
/// [`open`](Self::open), async and fallible, which will also open the stores the
/// configuration names (a database file, a DynamoDB table).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let config = tollgate::Config::from_toml_str("[plans.free]\nrate = \"10/s\"").unwrap();
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
    sink: Option<Arc<dyn BillingSink>>,
    clock: Option<Clock>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder").field("store", &self.store).field("sink", &self.sink).finish_non_exhaustive()
    }
}

impl Tollgate {
    /// Starts building an engine from a configuration. Without a store it uses a
    /// [`MemoryStore`]; without a billing sink closed windows stay unexported in the store.
    pub fn builder(config: Config) -> Builder {
        Builder { config, store: None, sink: None, clock: None }
    }
}

impl Builder {
    /// The store for counters, usage and the tenant directory.
    pub fn store(self, store: impl Store) -> Self {
        self.store_arc(Arc::new(store))
    }

    /// The store, already shared.
    pub fn store_arc(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Where closed usage windows are exported.
    pub fn billing_sink(mut self, sink: impl BillingSink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// The clock (the system clock by default; [`Clock::fake`] in tests).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Opens what the configuration names and builds the engine: the async, fallible way,
    /// for everything a deployment configures outside code.
    ///
    /// # Errors
    /// A [`BuildError`] saying what could not be opened.
    pub async fn open(self) -> Result<(Tollgate, Worker), BuildError> {
        Ok(self.build())
    }

    /// Builds the engine with the store given in code (a [`MemoryStore`] if none was).
    /// Returns the engine and the [`Worker`] to spawn.
    pub fn build(self) -> (Tollgate, Worker) {
        let metrics = Arc::new(Metrics::register());
        let limits = self.config.limits.clone();
        let fp = Fingerprinter::random();
        let clock = self.clock.unwrap_or_default();
        let runtime = Runtime::compile(self.config, &metrics, &clock);
        let (prefetch_tx, prefetch_rx) = mpsc::channel(PREFETCH_QUEUE);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Shared {
            runtime: ArcSwap::from_pointee(runtime),
            table: TenantTable::new(limits.max_tenants),
            store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
            sink: self.sink,
            clock,
            idempotency: Idempotency::new(limits.idempotency_window, limits.idempotency_capacity, fp),
            metrics,
            totals: Totals::default(),
            prefetch: prefetch_tx,
            pipeline: tokio::sync::Mutex::new(Pipeline::new()),
            sweep_now: Notify::new(),
            shutdown: shutdown_tx,
            unknown: moka::sync::Cache::builder()
                .max_capacity(limits.negative_capacity)
                .time_to_live(limits.negative_ttl)
                .build(),
            node: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(std::process::id())
            },
            seq: std::sync::atomic::AtomicU64::new(0),
            senders: std::sync::atomic::AtomicU64::new(0),
        };
        let tollgate = Tollgate { shared: Arc::new(shared) };
        let worker = Worker::new(tollgate.clone(), prefetch_rx, shutdown_rx);
        (tollgate, worker)
    }
}
