//! OpenTelemetry (feature `otel`): tollgate's spans and counters over OTLP.
//!
//! With the feature, every request's admission is a span (its parent the application's active
//! span, or the request's W3C trace context, `traceparent`), with the tenant, plan, decision,
//! policy and units as attributes;
//! the store calls it waits on are its child spans (`db.system`, `db.operation.name`, the
//! outcome), and each export pass is a span whose children are its store calls and its calls
//! to Stripe or Metronome. They go to the global tracer provider, so an application that
//! already installs OpenTelemetry's SDK sees them with its own; [`Otel::from_env`] installs one
//! exporting over OTLP/HTTP (protobuf) for an application that has none, and
//! [`Otel::observe`] exports the engine's counters ([`Stats`](crate::report::Stats)) beside the
//! Prometheus ones.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = tollgate::Config::from_toml_str("[plans.free]\nrate = \"10/s\"\n")?;
//! // OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 (unset: nothing is exported).
//! let otel = tollgate::otel::Otel::from_env("my-api")?;
//! let (tollgate, worker) = tollgate::Tollgate::builder(config).open().await?;
//! if let Some(otel) = &otel {
//!     otel.observe(&tollgate);
//! }
//! tokio::spawn(worker.run());
//! // ... serve ...
//! tollgate.shutdown().await?;
//! if let Some(otel) = otel {
//!     // What is batched is sent (it waits for the exporters: off the runtime's threads).
//!     tokio::task::spawn_blocking(move || otel.shutdown()).await??;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Without the feature none of it is compiled: the request path counts the same instructions.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry::{global, metrics::Meter};
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{metrics::SdkMeterProvider, trace::SdkTracerProvider, Resource};

use crate::engine::Tollgate;

/// The environment variable that turns export on: the collector's OTLP/HTTP base address
/// (`/v1/traces` and `/v1/metrics` are appended), as OpenTelemetry's SDKs read it.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Why OpenTelemetry could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtelError {
    /// An exporter or its HTTP client could not be built (a bad endpoint, say).
    #[error("the OTLP exporter could not be built: {0}")]
    Exporter(String),
    /// The providers could not flush or shut down (the collector unreachable).
    #[error("OpenTelemetry's providers did not shut down cleanly: {0}")]
    Shutdown(String),
}

/// The tracer and meter providers [`from_env`](Self::from_env) installed as OpenTelemetry's
/// global ones, exporting over OTLP/HTTP.
#[derive(Debug)]
pub struct Otel {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
    /// The engine's counters as last read for a collection ([`observe`](Self::observe)).
    snapshot: Arc<Mutex<Snapshot>>,
}

/// When the counters were last read, and what they were.
type Snapshot = (Option<std::time::Instant>, Vec<(String, u64, bool)>);

impl Otel {
    /// Exports spans and metrics over OTLP/HTTP to [`ENDPOINT_VAR`]'s address (and the other
    /// standard variables: `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
    /// `OTEL_METRIC_EXPORT_INTERVAL`, the per-signal endpoints), as the installed global
    /// providers, their resource's `service.name` `service`. `None` when the variable is unset
    /// or empty: nothing is installed. The exporters send from the SDK's own threads, over
    /// rustls (aws-lc-rs, webpki roots) for an `https` address.
    ///
    /// # Errors
    /// An exporter that cannot be built (its address, its TLS).
    pub fn from_env(service: &str) -> Result<Option<Self>, OtelError> {
        match std::env::var(ENDPOINT_VAR) {
            Ok(v) if !v.trim().is_empty() => Self::install(service, None).map(Some),
            _ => Ok(None),
        }
    }

    /// As [`from_env`](Self::from_env), to `endpoint` (an OTLP/HTTP base address,
    /// `http://collector:4318`) whatever the environment says.
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn to_endpoint(service: &str, endpoint: &str) -> Result<Self, OtelError> {
        Self::install(service, Some(endpoint))
    }

    fn install(service: &str, endpoint: Option<&str>) -> Result<Self, OtelError> {
        let failed = |e: &dyn std::fmt::Display| OtelError::Exporter(e.to_string());
        let resource = Resource::builder().with_service_name(service.to_owned()).build();
        let mut spans = SpanExporter::builder().with_http().with_http_client(client()?);
        let mut metrics = MetricExporter::builder().with_http().with_http_client(client()?);
        if let Some(base) = endpoint {
            let base = base.trim_end_matches('/');
            spans = spans.with_endpoint(format!("{base}/v1/traces"));
            metrics = metrics.with_endpoint(format!("{base}/v1/metrics"));
        }
        let tracer = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(spans.build().map_err(|e| failed(&e))?)
            .build();
        let meter = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_periodic_exporter(metrics.build().map_err(|e| failed(&e))?)
            .build();
        global::set_tracer_provider(tracer.clone());
        global::set_meter_provider(meter.clone());
        Ok(Self { tracer, meter, snapshot: Arc::default() })
    }

    /// Exports `tollgate`'s counters ([`Stats`](crate::report::Stats)) at each of the meter
    /// provider's collections, each as `tollgate.NAME` (its field's name): a counter of the
    /// node's running total, or a gauge for a level (tenants tracked, holds open, …), all read
    /// from one snapshot per collection. Call it once, for the process's engine: the
    /// instruments of a second call would stand for the same names.
    pub fn observe(&self, tollgate: &Tollgate) {
        use opentelemetry::metrics::MeterProvider as _;
        observe(&self.meter.meter(crate::base::trace::TRACER), tollgate, &self.snapshot);
    }

    /// Sends what the providers hold now (spans batched, the counters' values). It waits for
    /// the exporters (up to their timeouts): from async code, call it in
    /// `tokio::task::spawn_blocking`, or where a short block of a worker thread does no harm.
    ///
    /// # Errors
    /// A provider that could not export.
    pub fn flush(&self) -> Result<(), OtelError> {
        self.fresh();
        self.tracer.force_flush().map_err(|e| OtelError::Shutdown(e.to_string()))?;
        self.meter.force_flush().map_err(|e| OtelError::Shutdown(e.to_string()))
    }

    /// Sends what is left and stops the providers (at the end, after the engine's
    /// [`shutdown`](crate::Tollgate::shutdown)). It waits for the exporters, as
    /// [`flush`](Self::flush) does.
    ///
    /// # Errors
    /// A provider that could not export or stop.
    pub fn shutdown(self) -> Result<(), OtelError> {
        self.fresh();
        let spans = self.tracer.shutdown().map_err(|e| OtelError::Shutdown(e.to_string()));
        let metrics = self.meter.shutdown().map_err(|e| OtelError::Shutdown(e.to_string()));
        spans.and(metrics)
    }
}

impl Otel {
    /// The next collection reads the counters anew (a flush sends them as they are now).
    fn fresh(&self) {
        self.snapshot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0 = None;
    }
}

/// A blocking HTTP client over rustls (aws-lc-rs, webpki roots), as the other features'
/// clients: built on a thread of its own (a blocking client is not built inside a runtime).
fn client() -> Result<reqwest::blocking::Client, OtelError> {
    let build = || -> Result<reqwest::blocking::Client, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())
    };
    std::thread::spawn(build)
        .join()
        .map_err(|_| OtelError::Exporter("the thread building the HTTP client panicked".into()))?
        .map_err(OtelError::Exporter)
}

/// Each field of the engine's [`Stats`](crate::report::Stats), observed on `meter`, from one
/// snapshot per collection (the instruments' callbacks run one after the other within it: the
/// first to run after a second has passed reads the engine again).
fn observe(meter: &Meter, tollgate: &Tollgate, snapshot: &Arc<Mutex<Snapshot>>) {
    for (name, level) in crate::metrics::Stats::default().entries().into_iter().map(|(n, _, l)| (n, l)) {
        let (engine, snapshot) = (tollgate.clone(), snapshot.clone());
        let field = name.clone();
        let read = move || {
            let mut held = snapshot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if held.0.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                *held = (Some(std::time::Instant::now()), engine.stats().entries());
            }
            held.1.iter().find(|(n, _, _)| *n == field).map_or(0, |(_, v, _)| *v)
        };
        let name = format!("tollgate.{name}");
        if level {
            meter.u64_observable_gauge(name).with_callback(move |o| o.observe(read(), &[])).build();
        } else {
            meter.u64_observable_counter(name).with_callback(move |o| o.observe(read(), &[])).build();
        }
    }
}
