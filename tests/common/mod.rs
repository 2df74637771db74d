//! A service behind tollgate, driven in-process with a fake clock.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod alerts;
#[cfg(feature = "dynamodb")]
pub mod dynamo;
pub mod fleet;
pub mod holds;
#[cfg(feature = "metronome")]
pub mod metronome;
pub mod money;
pub mod orgs;
pub mod places;
pub mod plan_change;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "stripe")]
pub mod recharge;
#[cfg(feature = "redis")]
pub mod redis;
pub mod settings_audit;
pub mod stripe;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate::store::prelude::*;
use tollgate::{
    clock::{Clock, FakeClock},
    layer::TollgateBody,
    store::{
        CommitOutcome, DeadLetter, Deferral, EventOutcome, ExportClaim, ExportKey, ExportSend, Grant, LedgerEntry,
        MemoryStore, PlanChange, PlanChangeOutcome, QuotaKey, Reservation, StoreError, StoreInspect, TenantRecord,
        UsageAggregate, UsageBatch, UsageEvent,
    },
    Config, TenantContext, Tollgate, TollgateService,
};
use tower::{Layer, ServiceExt};

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;
type Handler = fn(Request<tollgate::layer::RequestBody<Full<Bytes>>>) -> HandlerFuture;

/// A log line writer into a shared buffer: what a test's thread logs, captured.
#[derive(Clone, Default)]
pub struct Lines(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// Captures this thread's warnings and errors until the guard drops.
    pub fn capture() -> (Lines, tracing::subscriber::DefaultGuard) {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        (lines, tracing::subscriber::set_default(subscriber))
    }

    /// What was captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

/// 2026-03-14T12:00:00Z
pub const NOON: i64 = 1_773_489_600;

/// Calls of the handler on `/echo` (each answer carries its number: a replay answered by
/// the handler again would carry a new one).
pub static ECHOES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn handler(req: Request<tollgate::layer::RequestBody<Full<Bytes>>>) -> HandlerFuture {
    Box::pin(async move {
        let ctx = req.extensions().get::<TenantContext>().cloned();
        let path = req.uri().path().to_owned();
        if path == "/echo" {
            // Reads the whole body: answers `call #n: <body>`, 201.
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let n = ECHOES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let text = format!("call #{n}: {}", String::from_utf8_lossy(&body));
            return Ok(Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "text/plain")
                .header("x-call", n.to_string())
                .body(Full::new(Bytes::from(text)))
                .unwrap());
        }
        if let Some(n) = path.strip_prefix("/big/") {
            // `n` bytes, without reading the body.
            let n: usize = n.parse().unwrap();
            return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
        }
        let status = match path.as_str() {
            "/fail" => StatusCode::INTERNAL_SERVER_ERROR,
            "/missing" => StatusCode::NOT_FOUND,
            _ => StatusCode::OK,
        };
        // `/tokens/N`, or `/tokens/N/...` (a route reading values from its path).
        if let (Some(n), Some(ctx)) = (path.strip_prefix("/tokens/"), &ctx) {
            ctx.record("tokens", n.split('/').next().unwrap_or_default().parse().unwrap()).unwrap();
        }
        let who = ctx.map(|c| format!("{} on {}", c.tenant(), c.plan())).unwrap_or_default();
        Ok(Response::builder().status(status).body(Full::new(Bytes::from(who))).unwrap())
    })
}

pub struct Harness {
    /// The layer hands the handler a `RequestBody` (`Full` cannot hold another body).
    pub svc: TollgateService<
        tower::util::ServiceFn<Handler>,
        tollgate::layer::FromConfig,
        tollgate::response::ProblemJson,
        tollgate::layer::Streamed,
    >,
    pub tollgate: Tollgate,
    pub clock: FakeClock,
    /// The memory store, when the harness made it.
    pub memory: Option<Arc<MemoryStore>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub rejection: Option<tollgate::Rejection>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl Harness {
    pub fn new(toml: &str) -> Self {
        Self::at(toml, NOON)
    }

    pub fn at(toml: &str, unix: i64) -> Self {
        let memory = Arc::new(MemoryStore::new());
        let mut h = Self::with_store(toml, memory.clone(), unix);
        h.memory = Some(memory);
        h
    }

    /// Units reserved for `key` in the harness's memory store.
    pub async fn reserved(&self, key: &QuotaKey) -> u64 {
        self.memory.as_ref().expect("a harness with its own memory store").reserved(key).await.unwrap()
    }

    pub fn with_store(toml: &str, store: Arc<dyn Store>, unix: i64) -> Self {
        let (clock, handle) = Clock::fake_at_unix(unix);
        Self::build(toml, store, clock, handle)
    }

    pub fn build(toml: &str, store: Arc<dyn Store>, clock: Clock, handle: FakeClock) -> Self {
        let config = Config::from_toml_str(toml).expect("valid test configuration");
        let (engine, _worker) = Tollgate::builder(config).store_arc(store).clock(clock).build();
        let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
        let tollgate = layer.handle().clone();
        let svc = layer.layer(tower::service_fn(handler as Handler));
        Self { svc, tollgate, clock: handle, memory: None }
    }

    /// A harness over a layer built by the test.
    pub fn from_layer(layer: tollgate::TollgateLayer, clock: FakeClock) -> Self {
        let layer = layer.streamed_bodies();
        let tollgate = layer.handle().clone();
        let svc = layer.layer(tower::service_fn(handler as Handler));
        Self { svc, tollgate, clock, memory: None }
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let response: Response<TollgateBody<Full<Bytes>>> = self.svc.clone().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply { status: parts.status, rejection: parts.extensions.get().cloned(), headers: parts.headers, body }
    }

    pub async fn get(&self, path: &str, key: &str) -> Reply {
        self.send(req("GET", path, Some(key), None)).await
    }

    pub async fn status(&self, path: &str, key: &str) -> u16 {
        self.get(path, key).await.status.as_u16()
    }
}

/// [`req`] with a body.
pub fn req_with(method: &str, path: &str, key: &str, idempotency: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut r = req(method, path, Some(key), Some(idempotency));
    *r.body_mut() = Full::new(Bytes::from_static(body));
    r
}

pub fn req(method: &str, path: &str, key: Option<&str>, idempotency: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    if let Some(i) = idempotency {
        b = b.header("idempotency-key", i);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// Total units committed to the store for (tenant, meter) over the windows starting in
/// [from, to), by walking the windows.
pub async fn committed(store: &dyn UsageStore, tenant: &str, meter: &str, from: i64, to: i64, window: i64) -> u64 {
    let start = from - from.rem_euclid(window);
    let all = store.usage_range(&tenant.into(), start, to).await.unwrap();
    all.iter().filter(|a| a.key.meter.as_str() == meter).map(|a| a.quantity).sum()
}

/// The name libtest gives the test `name` of the module `module` (`module_path!()`): the
/// module's path without the binary's crate name, then the test's, as a child process of the
/// test binary is told to run it with `--exact`.
pub fn test_name(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_, path)) => format!("{path}::{name}"),
        None => name.to_owned(),
    }
}

/// A configuration with one plan `p`, whose body is `plan` (TOML lines of `[plans.p]`), and
/// one tenant `t` on it with the API key `key-t`.
pub fn one_tenant(plan: &str) -> String {
    format!("[plans.p]\n{plan}\n[tenants.t]\nplan = \"p\"\nkeys = [\"key-t\"]\n")
}

/// Validates `bodies` against docs/usage.schema.json with Python's `jsonschema`
/// (scripts/check-json.py; skipped loudly without `TOLLGATE_MOTO_PYTHON`, required in CI).
pub fn check_usage_schema(bodies: &[bytes::Bytes]) {
    let python = match std::env::var("TOLLGATE_MOTO_PYTHON") {
        Ok(p) => p,
        _ if std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_REQUIRE_SERVERS").is_some() => {
            panic!("CI (or TOLLGATE_REQUIRE_SERVERS) is set but TOLLGATE_MOTO_PYTHON is not (scripts/test.sh sets it)")
        }
        _ => {
            eprintln!("SKIPPED: the schema check: TOLLGATE_MOTO_PYTHON (a Python with jsonschema) is not set");
            return;
        }
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new(python)
        .arg(root.join("scripts/check-json.py"))
        .arg(root.join("docs/usage.schema.json"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for body in bodies {
            stdin.write_all(body).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "not valid against docs/usage.schema.json:\n{text}");
    assert_eq!(text.trim(), format!("ok {}", bodies.len()));
}

/// A node of a fleet: a harness whose worker runs in the background.
pub fn node_with_worker(toml: &str, store: Arc<dyn Store>, clock: Clock, handle: FakeClock) -> Harness {
    node_on(toml, &NodeStore::Whole(store), clock, handle)
}

/// The stores of a node in a fleet test: one of every role, or the roles a Redis server serves
/// (quota, rate, places, idempotency) on it beside one of every other role.
#[derive(Clone)]
pub enum NodeStore {
    /// One store of every role.
    Whole(Arc<dyn Store>),
    /// `rest`, with the quota, rate, places and idempotency roles on `fleet`.
    Beside { rest: Arc<dyn Store>, fleet: Arc<dyn FleetRoles> },
}

/// The roles a Redis store serves.
pub trait FleetRoles:
    tollgate::store::QuotaInspect
    + tollgate::store::RateStore
    + tollgate::store::PlaceStore
    + tollgate::store::IdempotencyStore
{
}
impl<T> FleetRoles for T where
    T: tollgate::store::QuotaInspect
        + tollgate::store::RateStore
        + tollgate::store::PlaceStore
        + tollgate::store::IdempotencyStore
{
}

impl From<Arc<dyn StoreInspect>> for NodeStore {
    fn from(store: Arc<dyn StoreInspect>) -> Self {
        NodeStore::Whole(store)
    }
}

/// An engine's builder of `config` on `stores`.
pub fn builder_on(config: Config, stores: &NodeStore) -> tollgate::Builder {
    match stores {
        NodeStore::Whole(store) => Tollgate::builder(config).store_arc(store.clone()),
        NodeStore::Beside { rest, fleet } => Tollgate::builder(config)
            .store_arc(rest.clone())
            .quota_store(fleet.clone())
            .rate_store(fleet.clone())
            .places_store(fleet.clone())
            .idempotency_store(fleet.clone()),
    }
}

/// A node on `stores`, its worker running, on the fake clock.
pub fn node_on(toml: &str, stores: &NodeStore, clock: Clock, handle: FakeClock) -> Harness {
    let config = Config::from_toml_str(toml).expect("valid test configuration");
    let (engine, worker) = builder_on(config, stores).clock(clock).build();
    let layer = tollgate::TollgateLayer::new(engine).streamed_bodies();
    tokio::spawn(worker.run());
    let tollgate = layer.handle().clone();
    let svc = layer.layer(tower::service_fn(handler as Handler));
    Harness { svc, tollgate, clock: handle, memory: None }
}

/// Waits until `holds` says the background work a test asserts on is done, asking every 10 ms,
/// for at most `deadline`; fails naming `what` if it never is. Never a fixed sleep that races
/// the work.
pub async fn eventually<F, Fut>(what: &str, deadline: std::time::Duration, mut holds: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = std::time::Instant::now() + deadline;
    while !holds().await {
        assert!(std::time::Instant::now() < until, "{what}: not done within {deadline:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A memory store with switches for the faults the tests need: calls that fail, calls that
/// land without their answer coming back in time, and calls held until released; it also
/// counts the tenant lookups it answers.
#[derive(Debug)]
pub struct Faulty {
    pub inner: Arc<dyn StoreInspect>,
    /// Whether it stands for a durable store (a memory store stands for a database unless
    /// wrapped with [`Faulty::over`]).
    durable: bool,
    /// The next this many usage commits are applied, then answer with an error (a flush whose
    /// acknowledgement is lost: retried with the same id).
    pub lose_commit_answers: std::sync::atomic::AtomicU32,
    /// The next this many event commits are applied, then answer with an error.
    pub lose_event_answers: std::sync::atomic::AtomicU32,
    /// Usage events are written, and their answer never comes (counted in
    /// `hung_event_writes`).
    pub hang_event_answers: AtomicBool,
    /// Event writes that landed with their answer hung.
    pub hung_event_writes: std::sync::atomic::AtomicU32,
    /// Every call fails.
    pub down: AtomicBool,
    /// Export listings and directory reads never answer (a store that hangs).
    pub hang: AtomicBool,
    /// Usage writes and export listings fail.
    pub usage_down: AtomicBool,
    /// Quota calls are applied, then their answer never comes in time.
    pub lose_answers: AtomicBool,
    /// Quota calls of this tenant never answer.
    pub stall_tenant: std::sync::Mutex<Option<String>>,
    /// Quota calls of this tenant are answered with an error, not applied.
    pub refuse_tenant: std::sync::Mutex<Option<String>>,
    /// Quota calls of this tenant take this many milliseconds (a contended row), then apply.
    pub slow_tenant: std::sync::Mutex<Option<(String, u64)>>,
    /// Tenant lookups answered.
    pub lookups: AtomicU64,
    /// Directory reads of tenants whose id contains this fail (a record the store cannot
    /// decode; `""`: every tenant, the directory down).
    pub unreadable_tenants: std::sync::Mutex<Option<String>>,
    /// Directory reads of one tenant asked, failed or not.
    pub tenant_reads: AtomicU64,
    /// Key lookups take this many milliseconds (a slow directory).
    pub lookup_delay_ms: AtomicU64,
    /// Quota calls that reached the store.
    pub quota_calls: AtomicU64,
    /// The most units any reservation's answer counted used ([`Grant::used`]: reserved less
    /// what every sender said it keeps), and, while `watch_used`, any counter after a release.
    pub most_used_seen: AtomicU64,
    /// Each release is followed by a read of its counters, their units used counted in
    /// `most_used_seen`.
    pub watch_used: AtomicBool,
    /// Reads of usage (`usage_range`).
    pub usage_reads: AtomicU64,
    /// Reads of quota counters (`counters`).
    pub counter_reads: AtomicU64,
    /// Calls of the quota role's open values (claims, reads, forgets).
    pub value_calls: AtomicU64,
    /// The quota role's open values fail (the rest of the store answers).
    pub values_down: AtomicBool,
    /// The next usage read (`usage_range`) reads the store, then notifies the first and waits
    /// for the second before it answers (a read overtaken by a flush).
    pub hold_usage_read: std::sync::Mutex<Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>>,
    /// The next usage commit notifies the first and waits for the second before it reaches the
    /// store (a flush under way, its batch on its way).
    pub hold_commit: std::sync::Mutex<Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>>,
    /// The next event commit notifies the first and waits for the second before it reaches
    /// the store (a job's event on its way).
    pub hold_event_commit: std::sync::Mutex<Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>>,
    /// The next key lookup (`find_key`) reads the store, then notifies the first and waits for
    /// the second before it answers (a lookup overtaken by a change of the directory).
    pub hold_key_lookup: std::sync::Mutex<Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>>,
    /// `Idempotency-Key` writes (claims and settlements) that reached the store.
    pub idempotency_writes: AtomicU64,
    /// Idempotency reads (`read_idempotency`).
    pub idempotency_reads: AtomicU64,
    /// Rate calls (cells taken or given back) that reached the store.
    pub rate_calls: AtomicU64,
    /// Rate calls fail (the rate role's store down alone).
    pub rate_down: AtomicBool,
    /// Rate calls take this many milliseconds, then apply (a slow store, or a far one).
    pub rate_delay_ms: AtomicU64,
    /// Rate lease calls are applied, then their answer never comes in time.
    pub lose_rate_answers: AtomicBool,
    /// Places calls (acquire, renew, release) that reached the store.
    pub place_calls: AtomicU64,
    /// Places calls fail (the places role's store down alone).
    pub places_down: AtomicBool,
    /// Places acquisitions take this many milliseconds, then apply.
    pub place_delay_ms: AtomicU64,
    /// Places renewals take this many milliseconds, then apply.
    pub renew_delay_ms: AtomicU64,
    /// Alerts calls fail (the alerts role's store down alone).
    pub alerts_down: AtomicBool,
    /// Alert writes (`put_alerts`) that reached the store.
    pub alert_puts: AtomicU64,
    /// A plan change applied right after the next tenant read answers: a webhook landing
    /// between a read and the write made from it.
    pub plan_change_after_read: std::sync::Mutex<Option<PlanChange>>,
    /// `list_keys` of this tenant answers these keys, whatever was written since: a key
    /// index that lags (DynamoDB's).
    pub lagging_keys: std::sync::Mutex<Option<(String, Vec<tollgate::store::ApiKeyRecord>)>>,
    held: std::sync::Arc<tokio::sync::Mutex<()>>,
    guard: std::sync::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
}

impl Default for Faulty {
    fn default() -> Self {
        Self {
            inner: Arc::new(MemoryStore::new()),
            durable: true,
            lose_commit_answers: Default::default(),
            lose_event_answers: Default::default(),
            hang_event_answers: Default::default(),
            hung_event_writes: Default::default(),
            down: Default::default(),
            hang: Default::default(),
            usage_down: Default::default(),
            lose_answers: Default::default(),
            stall_tenant: Default::default(),
            refuse_tenant: Default::default(),
            slow_tenant: Default::default(),
            lookups: Default::default(),
            unreadable_tenants: Default::default(),
            tenant_reads: Default::default(),
            lookup_delay_ms: Default::default(),
            quota_calls: Default::default(),
            most_used_seen: Default::default(),
            watch_used: Default::default(),
            usage_reads: Default::default(),
            counter_reads: Default::default(),
            value_calls: Default::default(),
            values_down: Default::default(),
            hold_usage_read: Default::default(),
            hold_commit: Default::default(),
            hold_event_commit: Default::default(),
            hold_key_lookup: Default::default(),
            idempotency_writes: Default::default(),
            idempotency_reads: Default::default(),
            rate_calls: Default::default(),
            rate_down: Default::default(),
            rate_delay_ms: Default::default(),
            lose_rate_answers: Default::default(),
            place_calls: Default::default(),
            places_down: Default::default(),
            place_delay_ms: Default::default(),
            renew_delay_ms: Default::default(),
            alerts_down: Default::default(),
            alert_puts: Default::default(),
            plan_change_after_read: Default::default(),
            lagging_keys: Default::default(),
            held: Default::default(),
            guard: Default::default(),
        }
    }
}

impl Faulty {
    /// The faults over another store.
    pub fn over(inner: Arc<dyn StoreInspect>) -> Self {
        let durable = inner.is_durable();
        Self { inner, durable, ..Self::default() }
    }

    /// Holds every quota call until `stall(false)`.
    pub fn stall(&self, on: bool) {
        let mut g = self.guard.lock().unwrap();
        *g = if on { Some(self.held.clone().try_lock_owned().unwrap()) } else { None };
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Backend("switched off".into()))
        } else {
            Ok(())
        }
    }

    /// While [`Faulty::hang`]: never answers.
    async fn hung(&self) {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    fn check_usage(&self) -> Result<(), StoreError> {
        self.check()?;
        if self.usage_down.load(Ordering::SeqCst) {
            Err(StoreError::Backend("usage writes switched off".into()))
        } else {
            Ok(())
        }
    }

    async fn before_quota(&self, tenant: &str) -> Result<(), StoreError> {
        self.quota_calls.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        drop(self.held.lock().await);
        if self.refuse_tenant.lock().unwrap().as_deref() == Some(tenant) {
            return Err(StoreError::Backend(format!("a record of {tenant} the store refuses").into()));
        }
        let stalled = self.stall_tenant.lock().unwrap().as_deref() == Some(tenant);
        if stalled {
            std::future::pending::<()>().await;
        }
        let slow = self.slow_tenant.lock().unwrap().clone().filter(|(t, _)| t == tenant);
        if let Some((_, ms)) = slow {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        Ok(())
    }

    async fn after_quota(&self) {
        if self.lose_answers.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
    }
}

#[async_trait::async_trait]
impl QuotaStore for Faulty {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        self.before_quota(r.key.tenant.as_str()).await?;
        let g = self.inner.reserve(r).await;
        if let Ok(grant) = &g {
            self.most_used_seen.fetch_max(grant.used, Ordering::SeqCst);
        }
        self.after_quota().await;
        g
    }

    async fn release(&self, releases: &[tollgate::store::Release]) -> Vec<Result<(), StoreError>> {
        // Counted per call (a batch is one call).
        if let Some(first) = releases.first() {
            if let Err(e) = self.before_quota(first.key.tenant.as_str()).await {
                let why = e.to_string();
                return releases.iter().map(|_| Err(StoreError::Backend(why.clone().into()))).collect();
            }
        }
        let r = self.inner.release(releases).await;
        if self.watch_used.load(Ordering::SeqCst) {
            for release in releases {
                for c in self.inner.counters(&release.key.tenant, &release.key.meter).await.unwrap_or_default() {
                    self.most_used_seen.fetch_max(c.used(), Ordering::SeqCst);
                }
            }
        }
        self.after_quota().await;
        r
    }

    async fn grant_credits(
        &self,
        grant: &tollgate::store::CreditGrant,
    ) -> Result<tollgate::store::GrantOutcome, StoreError> {
        self.before_quota(grant.tenant.as_str()).await?;
        let r = self.inner.grant_credits(grant).await;
        self.after_quota().await;
        r
    }

    async fn credit_grants(
        &self,
        tenant: &tollgate::config::TenantId,
        meter: Option<&tollgate::config::MeterId>,
    ) -> Result<
        (Vec<tollgate::store::CreditGrant>, Vec<(tollgate::config::MeterId, tollgate::store::CreditBalance)>),
        StoreError,
    > {
        self.before_quota(tenant.as_str()).await?;
        let r = self.inner.credit_grants(tenant, meter).await;
        self.after_quota().await;
        r
    }

    async fn close_credits(
        &self,
        tenant: &tollgate::config::TenantId,
        meter: &tollgate::config::MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<tollgate::store::CreditClosure>, StoreError> {
        self.before_quota(tenant.as_str()).await?;
        let r = self.inner.close_credits(tenant, meter, id, revoke, now).await;
        self.after_quota().await;
        r
    }

    async fn refund_credits(
        &self,
        refund: &tollgate::store::CreditRefund,
    ) -> Result<tollgate::store::RefundOutcome, StoreError> {
        self.before_quota(refund.tenant.as_ref().map_or("", |t| t.as_str())).await?;
        let r = self.inner.refund_credits(refund).await;
        self.after_quota().await;
        r
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<tollgate::store::CreditGrant>, StoreError> {
        self.inner.expired_credits(now, limit).await
    }

    async fn counters(
        &self,
        tenant: &tollgate::config::TenantId,
        meter: &tollgate::config::MeterId,
    ) -> Result<Vec<tollgate::store::QuotaCounter>, StoreError> {
        self.counter_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.counters(tenant, meter).await
    }

    async fn values(
        &self,
        call: &tollgate::store::ValueCall,
        mode: tollgate::store::ValueMode,
    ) -> Result<tollgate::store::HeldValues, StoreError> {
        self.value_calls.fetch_add(1, Ordering::SeqCst);
        if self.values_down.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("open values switched off".into()));
        }
        self.before_quota(call.tenant.as_str()).await?;
        let r = self.inner.values(call, mode).await;
        self.after_quota().await;
        r
    }

    async fn payments(
        &self,
        call: &tollgate::store::PaymentCall,
        now: i64,
    ) -> Result<tollgate::store::PaymentAnswer, StoreError> {
        self.before_quota(call.tenant().as_str()).await?;
        let r = self.inner.payments(call, now).await;
        self.after_quota().await;
        r
    }
}

#[async_trait::async_trait]
impl UsageStore for Faulty {
    async fn commit_usage(&self, b: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        self.check_usage()?;
        let gate = self.hold_commit.lock().unwrap().take();
        if let Some((entered, release)) = gate {
            entered.notify_one();
            release.notified().await;
        }
        let outcome = self.inner.commit_usage(b).await?;
        let lose = self.lose_commit_answers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if lose.is_ok() {
            return Err(StoreError::Backend("the commit's answer was lost".into()));
        }
        Ok(outcome)
    }

    fn max_batch_records(&self) -> usize {
        self.inner.max_batch_records()
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        self.check_usage()?;
        let gate = self.hold_event_commit.lock().unwrap().take();
        if let Some((entered, release)) = gate {
            entered.notify_one();
            release.notified().await;
        }
        let out = self.inner.commit_events(events).await?;
        if self.hang_event_answers.load(Ordering::SeqCst) {
            self.hung_event_writes.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        let lose = self.lose_event_answers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if lose.is_ok() {
            return Err(StoreError::Timeout(std::time::Duration::from_millis(250)));
        }
        Ok(out)
    }

    async fn usage_range(
        &self,
        tenant: &tollgate::config::TenantId,
        from: i64,
        to: i64,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        self.usage_reads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        let read = self.inner.usage_range(tenant, from, to).await;
        let gate = self.hold_usage_read.lock().unwrap().take();
        if let Some((entered, release)) = gate {
            entered.notify_one();
            release.notified().await;
        }
        read
    }

    async fn tallies(&self, query: &tollgate::store::TallyQuery) -> Result<Vec<tollgate::store::Tally>, StoreError> {
        self.check()?;
        self.inner.tallies(query).await
    }
}

impl Faulty {
    /// Holds the next event commit before it reaches the store ([`hold_event_commit`](Self::hold_event_commit)):
    /// notified on the first when it is there, released by the second.
    pub fn hold_next_event_commit(&self) -> (Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
        let pair = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
        *self.hold_event_commit.lock().unwrap() = Some(pair.clone());
        pair
    }

    /// Holds the next key lookup once it has read the store ([`hold_key_lookup`](Self::hold_key_lookup)):
    /// notified on the first when it has, released by the second.
    pub fn hold_next_key_lookup(&self) -> (Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
        let pair = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
        *self.hold_key_lookup.lock().unwrap() = Some(pair.clone());
        pair
    }
}

#[async_trait::async_trait]
impl LedgerStore for Faulty {
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.check()?;
        self.hung().await;
        self.inner.ledger(hour, after, limit).await
    }

    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError> {
        self.check()?;
        self.inner.note_lacking(entry, now).await
    }

    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        self.check()?;
        self.inner.clear_lacking(entry).await
    }

    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.reexport(entry).await
    }
}

#[async_trait::async_trait]
impl ExportStore for Faulty {
    async fn pending_exports(
        &self,
        before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        self.check_usage()?;
        self.hung().await;
        self.inner.pending_exports(before, after, limit).await
    }

    async fn begin_export(
        &self,
        a: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        self.check()?;
        self.inner.begin_export(a, claim, send).await
    }

    async fn defer_export(&self, a: &UsageAggregate, claim: &ExportClaim, d: Deferral) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.defer_export(a, claim, d).await
    }

    async fn finish_export(&self, a: &UsageAggregate, now: i64) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.finish_export(a, now).await
    }

    async fn dead_letter(&self, a: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        self.inner.dead_letter(a, reason).await
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters(after, limit).await
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        self.inner.requeue_dead_letter(key).await
    }

    async fn identifier_namespace(&self) -> Result<String, StoreError> {
        self.check()?;
        self.hung().await;
        self.inner.identifier_namespace().await
    }

    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.set_identifier_namespace(current, new).await
    }

    fn is_durable(&self) -> bool {
        // A memory store made by `default` stands for a database: shutdown exports only closed
        // windows.
        self.durable
    }
}

#[async_trait::async_trait]
impl DirectoryStore for Faulty {
    async fn list_tenants(
        &self,
        after: Option<&tollgate::config::TenantId>,
        limit: usize,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        self.hung().await;
        self.inner.list_tenants(after, limit).await
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        self.check()?;
        self.hung().await;
        self.inner.tenant_by_customer(customer).await
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        self.check()?;
        self.inner.apply_plan_change(change).await
    }

    async fn changes(&self, call: tollgate::store::ChangeCall<'_>) -> Result<tollgate::store::Changes, StoreError> {
        self.check()?;
        self.inner.changes(call).await
    }

    async fn update_tenant(
        &self,
        update: &tollgate::store::TenantUpdate,
        when: tollgate::store::UpdateWhen<'_>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.update_tenant(update, when).await
    }

    async fn key(&self, key: &tollgate::store::KeyHash) -> Result<Option<tollgate::store::ApiKeyRecord>, StoreError> {
        self.check()?;
        self.inner.key(key).await
    }

    async fn find_key(&self, key: &tollgate::store::KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        self.check()?;
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let delay = self.lookup_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let found = self.inner.find_key(key).await;
        let gate = self.hold_key_lookup.lock().unwrap().take();
        if let Some((entered, release)) = gate {
            entered.notify_one();
            release.notified().await;
        }
        found
    }

    async fn tenant(&self, id: &tollgate::config::TenantId) -> Result<Option<TenantRecord>, StoreError> {
        self.tenant_reads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.hung().await;
        if self.unreadable_tenants.lock().unwrap().as_deref().is_some_and(|p| id.as_str().contains(p)) {
            return Err(StoreError::Backend(format!("the record of {id} cannot be decoded").into()));
        }
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let read = self.inner.tenant(id).await;
        let change = self.plan_change_after_read.lock().unwrap().take();
        if let Some(change) = change {
            self.inner.apply_plan_change(&change).await?;
        }
        read
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[tollgate::store::KeyHash]) -> Result<(), StoreError> {
        self.inner.put_tenant(record, keys).await
    }

    async fn remove_key(&self, key: &tollgate::store::KeyHash) -> Result<(), StoreError> {
        self.inner.remove_key(key).await
    }

    async fn put_key(
        &self,
        key: &tollgate::store::ApiKeyRecord,
        when: tollgate::store::KeyWrite,
    ) -> Result<(), StoreError> {
        self.inner.put_key(key, when).await
    }

    async fn list_keys(
        &self,
        tenant: &tollgate::config::TenantId,
    ) -> Result<Vec<tollgate::store::ApiKeyRecord>, StoreError> {
        if let Some((of, keys)) = self.lagging_keys.lock().unwrap().as_ref() {
            if of == tenant.as_str() {
                return Ok(keys.clone());
            }
        }
        self.inner.list_keys(tenant).await
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for Faulty {
    async fn claim_idempotency(
        &self,
        claim: &tollgate::store::IdempotencyClaim,
    ) -> Result<tollgate::store::IdempotencyState, StoreError> {
        self.idempotency_writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.claim_idempotency(claim).await
    }

    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<tollgate::store::IdempotencyState>, StoreError> {
        self.idempotency_reads.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.read_idempotency(key, request, now).await
    }

    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &tollgate::store::IdempotencySettle,
    ) -> Result<tollgate::store::IdempotencySettled, StoreError> {
        self.idempotency_writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.settle_idempotency(key, owner, how).await
    }
}

#[async_trait::async_trait]
impl tollgate::store::RateStore for Faulty {
    async fn take_cells(&self, call: &tollgate::store::CellCall) -> Result<tollgate::store::CellGrant, StoreError> {
        self.rate_calls.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        if self.rate_down.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("the rate store is down".into()));
        }
        let delay = self.rate_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let grant = self.inner.take_cells(call).await;
        if self.lose_rate_answers.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
        grant
    }

    async fn return_cells(&self, call: &tollgate::store::CellReturn) -> Result<(), StoreError> {
        self.rate_calls.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        if self.rate_down.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("the rate store is down".into()));
        }
        self.inner.return_cells(call).await
    }
}

impl Faulty {
    fn place_call(&self) -> Result<(), StoreError> {
        self.place_calls.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        if self.places_down.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("the places store is down".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl tollgate::store::PlaceStore for Faulty {
    async fn places(
        &self,
        call: &tollgate::store::PlaceCall,
        mode: tollgate::store::PlaceMode,
    ) -> Result<tollgate::store::Places, StoreError> {
        use tollgate::store::PlaceMode;
        self.place_call()?;
        let delay = match mode {
            PlaceMode::Acquire => self.place_delay_ms.load(Ordering::SeqCst),
            PlaceMode::Renew => self.renew_delay_ms.load(Ordering::SeqCst),
            PlaceMode::Release => 0,
        };
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        self.inner.places(call, mode).await
    }
}

impl Faulty {
    fn alerts_call(&self) -> Result<(), StoreError> {
        self.check()?;
        if self.alerts_down.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("the alerts store is down".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl tollgate::store::OutboxStore for Faulty {
    async fn put_alerts(&self, entries: &[tollgate::store::OutboxEntry]) -> Result<usize, StoreError> {
        self.alert_puts.fetch_add(1, Ordering::SeqCst);
        self.alerts_call()?;
        self.inner.put_alerts(entries).await
    }

    async fn claim_alerts(
        &self,
        claim: &tollgate::store::AlertClaim,
    ) -> Result<Vec<tollgate::store::OutboxEntry>, StoreError> {
        self.alerts_call()?;
        self.inner.claim_alerts(claim).await
    }

    async fn settle_alert(
        &self,
        key: &tollgate::store::AlertKey,
        owner: u64,
        outcome: &tollgate::store::AlertOutcome,
    ) -> Result<bool, StoreError> {
        self.alerts_call()?;
        self.inner.settle_alert(key, owner, outcome).await
    }

    async fn list_alerts(
        &self,
        query: &tollgate::store::AlertQuery,
    ) -> Result<Vec<tollgate::store::OutboxEntry>, StoreError> {
        self.alerts_call()?;
        self.inner.list_alerts(query).await
    }

    async fn requeue_alert(&self, key: &tollgate::store::AlertKey, now: i64) -> Result<bool, StoreError> {
        self.alerts_call()?;
        self.inner.requeue_alert(key, now).await
    }

    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError> {
        self.alerts_call()?;
        self.inner.prune_alerts(now).await
    }
}

#[async_trait::async_trait]
impl tollgate::store::AuditStore for Faulty {
    async fn append_audit(&self, record: &tollgate::store::AuditRecord) -> Result<i64, StoreError> {
        self.inner.append_audit(record).await
    }

    async fn list_audit(
        &self,
        query: &tollgate::store::AuditQuery,
    ) -> Result<Vec<tollgate::store::AuditRecord>, StoreError> {
        self.inner.list_audit(query).await
    }

    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        self.inner.prune_audit(before).await
    }
}

#[async_trait::async_trait]
impl QuotaInspect for Faulty {
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError> {
        self.inner.reserved(key).await
    }
}

#[async_trait::async_trait]
impl UsageInspect for Faulty {
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        self.inner.usage(key).await
    }
}

/// The counter of `tenant`'s requests for the day of `unix` (a day quota).
pub fn day_key(tenant: &str, unix: i64) -> QuotaKey {
    let start = unix - unix.rem_euclid(86_400);
    QuotaKey::new(tenant.into(), "requests".into(), tollgate::config::Period::Day, start, start + 86_400)
}

/// A billing sink that keeps the events it is sent.
#[derive(Debug, Default, Clone)]
pub struct Collect(pub Arc<std::sync::Mutex<Vec<tollgate::billing::MeterEvent>>>);

#[async_trait::async_trait]
impl tollgate::billing::BillingSink for Collect {
    async fn send(&self, event: &tollgate::billing::MeterEvent) -> Result<(), tollgate::billing::SinkError> {
        self.0.lock().unwrap().push(event.clone());
        Ok(())
    }
}

/// Two nodes (engines with their workers) on one store: an `Idempotency-Key` answers the same
/// on both. The first request holds the key on node A (in flight): node B answers 409; once it
/// completed, B replays it without charging or billing; another request with the key gets 422
/// on either node; and the usage stored is one request's.
pub async fn idempotency_holds_across_nodes(store: Arc<dyn Store>, store_b: Arc<dyn Store>, tenant: &str, key: &str) {
    use tollgate::door::Admission;
    use tollgate::door::Credential;
    use tollgate::door::RequestInfo;
    use tollgate::RejectionKind;
    // Both nodes' calls wait for each other's (on one SQLite file, its write lock): on a loaded
    // machine a call passes the default 250 ms and its request is answered 503.
    let toml = format!(
        "[usage]\nstore_timeout = \"30s\"\n\
         [plans.p]\nquotas.requests = {{ limit = 100, period = \"day\", mode = \"hard\" }}\n\
         [tenants.{tenant}]\nplan = \"p\"\nkeys = [\"{key}\"]\n"
    );
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let a = node_with_worker(&toml, store.clone(), clock.clone(), handle.clone());
    let b = node_with_worker(&toml, store_b, clock, handle);
    let info = RequestInfo::new("POST", "/orders", Credential::ApiKey(key.as_bytes())).with_idempotency_key(b"order-7");
    let mut first = match a.tollgate.admit(&info) {
        Admission::Pending(p) => a.tollgate.resolve(p).await.unwrap(),
        other => panic!("a key this node has not seen asks the store: {other:?}"),
    };
    // The door stores the response with the key.
    let mut capture = first.capture().expect("the first request with a key has its response captured");
    capture.request_body().end();
    let post = |path: &str| req("POST", path, Some(key), Some("order-7"));
    let r = b.send(post("/orders")).await;
    assert_eq!(r.status, 409, "in flight on node A");
    assert_eq!(r.rejection.unwrap().kind(), RejectionKind::IdempotencyKeyInUse);
    assert_eq!(b.send(post("/other")).await.status, 422, "bound to another request");
    capture.head(201, [("content-type", &b"text/plain"[..]), ("date", b"Sat, 14 Mar 2026 12:00:00 GMT")]);
    capture.data(b"order ");
    capture.data(b"7");
    assert!(first.complete(201));
    capture.finish();
    // The claim is settled in the store right after the response.
    let mut replay = b.send(post("/orders")).await;
    for _ in 0..1500 {
        if replay.status != 409 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        replay = b.send(post("/orders")).await;
    }
    assert_eq!(replay.status, 201, "a replay on node B, answered with A's response");
    assert_eq!(&replay.body[..], b"order 7");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("content-type"), Some("text/plain"));
    assert_eq!(replay.header("date"), None, "Date belongs to each answer");
    let again = b.send(post("/orders")).await;
    assert_eq!((again.status.as_u16(), &again.body[..]), (201, &b"order 7"[..]), "and again, through B's memory");
    assert_eq!(a.send(post("/other")).await.status, 422);
    assert_eq!(b.send(post("/other")).await.status, 422);
    a.tollgate.shutdown().await.unwrap();
    b.tollgate.shutdown().await.unwrap();
    let stored = store.usage_range(&tenant.into(), NOON - 86_400, NOON + 86_400).await.unwrap();
    assert_eq!(stored.iter().map(|u| u.quantity).sum::<u64>(), 1, "billed once across the fleet: {stored:?}");
}

/// How many of a test's things (tenants, calls) to make: `suite` in the test suite, `stress`
/// under `scripts/stress.sh` (`TOLLGATE_STRESS=1`), which runs the long scale runs CI leaves
/// out of its 40 minutes.
pub fn scale(suite: usize, stress: usize) -> usize {
    if std::env::var_os("TOLLGATE_STRESS").is_some_and(|v| v == "1") {
        stress
    } else {
        suite
    }
}

/// A node of `tenants` tenants, each with a lease of two meters, shuts down (`usage` lines of
/// `[usage]`: its timeout): every lease goes back in time, in batches, and each counter then
/// holds exactly what was used (issue 52). Returns the time the shutdown took and the store
/// calls it made, as `calls` counts them (a store's own count of requests sent).
pub async fn tenants_give_their_leases_back_at_shutdown(
    store: Arc<dyn StoreInspect>,
    tenants: usize,
    usage: &str,
    calls: &(dyn Fn() -> u64 + Sync),
) -> (std::time::Duration, u64) {
    let reader: Arc<dyn tollgate::store::QuotaInspect> = store.clone();
    tenants_give_their_leases_back_on(&NodeStore::Whole(store), reader, tenants, usage, calls).await
}

/// [`tenants_give_their_leases_back_at_shutdown`] on `stores` (the quota role's on Redis, say),
/// the counters read from `reader`.
pub async fn tenants_give_their_leases_back_on(
    stores: &NodeStore,
    store: Arc<dyn tollgate::store::QuotaInspect>,
    tenants: usize,
    usage: &str,
    calls: &(dyn Fn() -> u64 + Sync),
) -> (std::time::Duration, u64) {
    use std::fmt::Write as _;
    let step = (tenants / 10).max(1);
    // A generous store timeout for the many first calls made at once on a small pool, or on
    // moto, whose transactions copy the table (on a loaded machine 64 of them pass 5 s); the
    // shutdown's timeout is the caller's (`usage`).
    let toml = String::from(
        "[usage]\nstore_timeout = \"60s\"\n{usage}\n[meters.images]\n[plans.p]\nrate = \"100000/s\"\n\
         quotas.requests = { limit = 100000, period = \"day\", mode = \"hard\", lease = 50 }\n\
         quotas.images = { limit = 100000, period = \"day\", mode = \"hard\", lease = 50 }\n\
         [[routes]]\npath = \"/images\"\nmeter = \"images\"\n",
    );
    let mut toml = toml.replace("{usage}", usage);
    for i in 0..tenants {
        let _ = write!(toml, "[tenants.t{i}]\nplan = \"p\"\nkeys = [\"key-{i}\"]\n");
    }
    let config = Config::from_toml_str(&toml).unwrap();
    let (clock, handle) = Clock::fake_at_unix(NOON);
    let (engine, _worker) = builder_on(config, stores).clock(clock).build();
    let h = Arc::new(Harness::from_layer(tollgate::TollgateLayer::new(engine), handle));
    // 64 tenants at a time: each first request of a meter is a store call.
    for chunk in (0..tenants).collect::<Vec<_>>().chunks(64) {
        let mut calls = tokio::task::JoinSet::new();
        for i in chunk {
            let key: &'static str = Box::leak(format!("key-{i}").into_boxed_str());
            let h = h.clone();
            calls.spawn(async move {
                assert_eq!(h.status("/", key).await, 200);
                assert_eq!(h.status("/images", key).await, 200);
            });
        }
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
    }
    // The usage first (the shutdown's flush then has nothing to commit): what is timed is
    // giving the leases back.
    let flushed = std::time::Instant::now();
    h.tollgate.flush().await.unwrap();
    eprintln!("flush of {} records: {:?}", 2 * tenants, flushed.elapsed());
    let (started, calls_before) = (std::time::Instant::now(), calls());
    let report = h.tollgate.shutdown().await.unwrap();
    let (took, made) = (started.elapsed(), calls() - calls_before);
    eprintln!("shutdown of {tenants} tenants × 2 meters: {took:?}, {made} store calls");
    assert!(report.leases_returned, "every lease given back within the shutdown timeout: {report:?}");
    for i in (0..tenants).step_by(step) {
        for meter in ["requests", "images"] {
            let counters = store.counters(&format!("t{i}").as_str().into(), &meter.into()).await.unwrap();
            let reserved: u64 = counters.iter().map(|c| c.reserved).sum();
            assert_eq!(reserved, 1, "t{i} {meter}: what was used, the rest given back");
        }
    }
    eprintln!("{} leases given back in {took:?}", 2 * tenants);
    (took, made)
}

/// The ticket of a request `engine` admits (waiting on the store if it must); a refusal fails
/// the test.
pub async fn admitted_ticket(engine: &Tollgate, info: &tollgate::door::RequestInfo<'_>) -> tollgate::door::Ticket {
    match engine.admit(info) {
        tollgate::door::Admission::Admitted(t) => t,
        tollgate::door::Admission::Pending(p) => engine.resolve(p).await.unwrap_or_else(|r| panic!("{r}")),
        tollgate::door::Admission::Rejected(r) => panic!("{r}"),
    }
}
