//! Usage events to Metronome (`POST /v1/ingest`), through a small private client: reqwest over
//! rustls with the aws-lc-rs provider and the webpki roots.
//!
//! Metronome's rules, from its API reference ("Ingest events",
//! <https://docs.metronome.com/api-reference/usage/ingest-events>) and its guide ("Send usage
//! events"): the body is a JSON array of 1 to 100 usage events; `transaction_id` is the
//! idempotency key, a repeated one ignored for 34 days; events may be backdated up to 34 days,
//! and are refused more than 24 hours ahead; `timestamp` is RFC 3339; property values are sent
//! as strings (Metronome computes in arbitrary-precision decimals).

use std::{fmt, path::Path, time::Duration};

use async_trait::async_trait;
use serde::Serialize;

use super::{BillingSink, CustomerField, MeterEvent, Secret, SinkError, SinkLimits};
use crate::base::SinkKind;
use crate::config::{Config, MeterAggregation};

/// Why the Metronome sink could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetronomeSetupError {
    /// No token: neither `METRONOME_API_TOKEN` nor the file `metronome.api_token_file` names.
    #[error("no Metronome API token: set METRONOME_API_TOKEN or api_token_file in [metronome]")]
    MissingToken,
    /// The token file could not be read.
    #[error("cannot read the Metronome token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client could not be built.
    #[error("cannot build the Metronome client: {0}")]
    Client(String),
}

/// Sends usage events to Metronome's `POST /v1/ingest`, up to 100 in one call.
///
/// Each event is one (tenant, meter, window, revision):
///
/// | Metronome field | from |
/// |---|---|
/// | `transaction_id` | [`MeterEvent::identifier`]: the same for every re-send |
/// | `customer_id` | the tenant's `metronome_customer` (a Metronome customer id or an ingest alias) |
/// | `event_type` | the meter's `event_name` |
/// | `timestamp` | [`MeterEvent::timestamp`], RFC 3339 (`2026-11-23T14:59:59Z`) |
/// | `properties` | `value` (a decimal string), `tenant`, `meter`, `window_start`, `window_end` (RFC 3339), `revision` |
///
/// Metronome ignores a repeated `transaction_id` for 34 days, so a batch that failed without an
/// answer is sent again as it was. Statuses are mapped so:
///
/// | Metronome answers | [`SinkError`] |
/// |---|---|
/// | 2xx | taken (a repeated `transaction_id` is answered 200 and ignored) |
/// | 429 (not executed; its `Retry-After` is honoured); no connection (refused, name lookup, TLS) | [`NotTaken`](SinkError::NotTaken): retried without limit |
/// | 408, 409, 5xx | [`Retryable`](SinkError::Retryable) (with the `Retry-After` it gives) |
/// | 401, 403 (the token), 404 (not Metronome's API: a wrong `api_base`) | [`Halt`](SinkError::Halt): the pass stops, nothing is parked |
/// | 400 and another 4xx | [`Permanent`](SinkError::Permanent): a batch is bisected until the refused event is found, then it alone is dead-lettered |
/// | no status (connection dropped, timeout) | [`Unknown`](SinkError::Unknown) |
///
/// Pre-aggregated meters (`aggregation = "hour" | "day"`) are a Stripe Billing Meters notion:
/// the configuration refuses them with `export.sink = "metronome"`, and this sink refuses
/// their events.
pub struct MetronomeSink {
    client: reqwest::Client,
    /// `{api_base}v1/ingest`.
    url: String,
    token: Secret,
}

impl fmt::Debug for MetronomeSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetronomeSink").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Metronome's API when no `api_base` is given.
const API_BASE: &str = "https://api.metronome.com/";

/// The most events one call to `/v1/ingest` carries.
const MAX_EVENTS: usize = 100;

impl MetronomeSink {
    /// A sink calling Metronome with this API token; `api_base` replaces
    /// `https://api.metronome.com/` (a local stand-in, a proxy). Each call may take `timeout`.
    ///
    /// # Errors
    /// The client cannot be built.
    pub fn new(token: &Secret, api_base: Option<&str>, timeout: Duration) -> Result<Self, MetronomeSetupError> {
        let base = api_base.unwrap_or(API_BASE);
        let url = format!("{}/v1/ingest", base.trim_end_matches('/'));
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MetronomeSetupError::Client(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MetronomeSetupError::Client(e.to_string()))?;
        Ok(Self { client, url, token: token.clone() })
    }

    /// The sink the configuration's `[metronome]` section describes (its defaults without
    /// one), with the token from `metronome.api_token_file` or `METRONOME_API_TOKEN`.
    ///
    /// # Errors
    /// No token, or the client cannot be built.
    pub fn from_config(config: &Config) -> Result<Self, MetronomeSetupError> {
        let settings = config.metronome();
        let token = read_token(settings.and_then(|s| s.api_token_file.as_deref()))?;
        let timeout = settings.map_or(Duration::from_secs(30), |s| s.timeout);
        Self::new(&token, settings.and_then(|s| s.api_base.as_deref()), timeout)
    }

    /// The URL events are sent to.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn ingest(&self, events: &[MeterEvent]) -> Result<(), SinkError> {
        let mut body = Vec::with_capacity(events.len());
        for event in events {
            body.push(Usage::of(event)?);
        }
        let sent = self.client.post(&self.url).bearer_auth(self.token.expose()).json(&body).send().await;
        let response = match sent {
            Ok(r) => r,
            // Never left this machine: no connection could be made.
            Err(e) if e.is_connect() => return Err(SinkError::NotTaken { source: Box::new(e), retry_after: None }),
            Err(e) => return Err(SinkError::Unknown(Box::new(e))),
        };
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        let retry_after =
            response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| retry_after(v.to_str().ok()?));
        let text = match response.text().await {
            Ok(t) => t,
            Err(e) => format!("(the body could not be read: {e})"),
        };
        let detail = format!("{status}: {}", message(&text));
        Err(match status {
            // Refused without being executed: rate limited.
            429 => SinkError::NotTaken { source: detail.into(), retry_after },
            408 | 409 | 500..=599 => SinkError::Retryable { source: detail.into(), retry_after },
            // The token refused, or an address that is not Metronome's API.
            401 | 403 | 404 => SinkError::Halt(detail),
            _ => SinkError::Permanent(detail),
        })
    }
}

#[async_trait]
impl BillingSink for MetronomeSink {
    async fn send(&self, event: &MeterEvent) -> Result<(), SinkError> {
        self.ingest(std::slice::from_ref(event)).await
    }

    async fn send_batch(&self, events: &[MeterEvent]) -> Result<(), SinkError> {
        for chunk in events.chunks(MAX_EVENTS) {
            self.ingest(chunk).await?;
        }
        Ok(())
    }

    fn limits(&self) -> SinkLimits {
        SinkKind::Metronome.limits()
    }

    fn customer_field(&self) -> CustomerField {
        SinkKind::Metronome.customer_field()
    }

    fn needs_customer(&self) -> bool {
        SinkKind::Metronome.needs_customer()
    }
}

/// One usage event as `/v1/ingest` takes it.
#[derive(Serialize)]
struct Usage<'a> {
    transaction_id: &'a str,
    customer_id: &'a str,
    event_type: &'a str,
    timestamp: String,
    properties: Properties<'a>,
}

/// Property values are strings, as Metronome asks.
#[derive(Serialize)]
struct Properties<'a> {
    value: String,
    tenant: &'a str,
    meter: &'a str,
    window_start: String,
    window_end: String,
    revision: String,
    /// A series' values, as properties Metronome's billable metrics group by.
    #[serde(flatten)]
    dimensions: std::collections::BTreeMap<&'a str, &'a str>,
}

impl<'a> Usage<'a> {
    fn of(event: &'a MeterEvent) -> Result<Self, SinkError> {
        let Some(customer) = event.customer.as_deref() else {
            return Err(SinkError::Permanent("the tenant has no Metronome customer".into()));
        };
        if event.aggregation != MeterAggregation::Sum {
            return Err(SinkError::Permanent(format!(
                "meter `{}` is pre-aggregated, which Metronome does not take: make it a sum meter",
                event.meter
            )));
        }
        Ok(Self {
            transaction_id: &event.identifier,
            customer_id: customer,
            event_type: &event.event_name,
            timestamp: rfc3339(event.timestamp)?,
            properties: Properties {
                value: event.value.to_string(),
                tenant: event.tenant.as_str(),
                meter: event.meter.as_str(),
                window_start: rfc3339(event.window_start)?,
                window_end: rfc3339(event.window_end)?,
                revision: event.revision.to_string(),
                dimensions: event.dimensions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            },
        })
    }
}

/// `unix` as RFC 3339 in UTC with a four-digit year (`2026-11-23T14:59:59Z`).
fn rfc3339(unix: i64) -> Result<String, SinkError> {
    chrono::DateTime::from_timestamp(unix, 0)
        .filter(|t| (0..=9999).contains(&chrono::Datelike::year(t)))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .ok_or_else(|| SinkError::Permanent(format!("time {unix} cannot be written in RFC 3339")))
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    let secs = at.timestamp() - crate::store::unix_now();
    Some(Duration::from_secs(secs.clamp(0, 3600) as u64))
}

/// Metronome's error message (`{"message": …}`), else the body's start.
fn message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    match parsed.as_ref().and_then(|v| v.get("message")).and_then(|m| m.as_str()) {
        Some(m) => m.to_owned(),
        None => body.chars().take(300).collect(),
    }
}

/// The token from `file` (its first line that is not blank or a `#` comment), else from
/// `METRONOME_API_TOKEN`.
fn read_token(file: Option<&Path>) -> Result<Secret, MetronomeSetupError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| MetronomeSetupError::TokenFile { path: path.to_owned(), source })?,
        None => std::env::var("METRONOME_API_TOKEN").unwrap_or_default(),
    };
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(Secret::new)
        .ok_or(MetronomeSetupError::MissingToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_with_a_four_digit_year_and_retry_after_is_read_both_ways() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_445_999).unwrap(), "2026-11-23T14:59:59Z");
        assert!(rfc3339(i64::MAX).is_err());
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
        assert_eq!(message(r#"{"message":"bad event"}"#), "bad event");
    }
}
