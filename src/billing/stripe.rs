//! Meter events to Stripe Billing Meters, through async-stripe (rustls).

use std::{collections::HashMap, fmt, path::Path, time::Duration};

use async_trait::async_trait;
use stripe::{IdempotencyKey, RequestStrategy, StripeError};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;

use super::{BillingSink, MeterEvent, Secret, SinkError};
use crate::config::Config;

/// Why Stripe's secrets or client could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StripeSetupError {
    /// No secret: neither the environment variable nor the file the configuration names.
    #[error("no Stripe secret: set {env} or {file_key} in [stripe]")]
    MissingSecret {
        /// The environment variable read.
        env: &'static str,
        /// The configuration key naming a file.
        file_key: &'static str,
    },
    /// The secret file could not be read.
    #[error("cannot read the Stripe secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client could not be built.
    #[error("cannot build the Stripe client: {0}")]
    Client(String),
    /// `[stripe.credits.prices]` names a lookup key, and there is no secret key to resolve it
    /// with: invoice lines name their price by id alone, so every renewal would be paid and
    /// credit nothing.
    #[error(
        "stripe.credits.prices.{key}: a lookup key (not a price id, which starts with `price_`) needs a Stripe \
         secret key to be matched with invoice lines: set STRIPE_SECRET_KEY or secret_key_file in [stripe], or \
         name the price by its id"
    )]
    LookupKeyWithoutSecretKey {
        /// The lookup key.
        key: String,
    },
}

/// Reads secrets from the file if one is named, else from the environment variable; a file
/// holds one per line (blank lines and `#` comments skipped), the variable several separated
/// by commas.
pub(crate) fn read_secrets(
    file: Option<&Path>,
    env: &'static str,
    file_key: &'static str,
) -> Result<Vec<Secret>, StripeSetupError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| StripeSetupError::SecretFile { path: path.to_owned(), source })?,
        None => std::env::var(env).unwrap_or_default().replace(',', "\n"),
    };
    let secrets: Vec<Secret> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(Secret::new).collect();
    if secrets.is_empty() {
        return Err(StripeSetupError::MissingSecret { env, file_key });
    }
    Ok(secrets)
}

/// Sends meter events to Stripe Billing Meters (`POST /v1/billing/meter_events`) with the
/// real async-stripe client over rustls.
///
/// Each event goes out once per call with its identifier as both the meter event's
/// `identifier` (Stripe drops a repeated one) and the `Idempotency-Key` (a retry is answered
/// as the first call was); the exporter retries with the same parameters, which it keeps in
/// the store. Statuses are mapped so:
///
/// | Stripe answers | [`SinkError`] |
/// |---|---|
/// | 2xx | accepted |
/// | 400 "An event already exists with identifier …" (with or without a `code`) | [`AlreadyHeld`](SinkError::AlreadyHeld): delivered in a store with a namespace, else parked for reconciliation |
/// | 429 (not executed); no connection (refused, name lookup, TLS) | [`NotTaken`](SinkError::NotTaken): retried without limit |
/// | 408, 409 (a request with the key may be executing), 424, 5xx | [`Retryable`](SinkError::Retryable) |
/// | 401, 403 (the key), 404 (not Stripe's API: a wrong `api_base`) | [`Halt`](SinkError::Halt): the pass stops, nothing is parked |
/// | 400 `idempotency_error` (the key used with other parameters) | [`Unsettled`](SinkError::Unsettled): parked for reconciliation |
/// | another 4xx | [`Permanent`](SinkError::Permanent): dead-lettered |
/// | no status (connection dropped, timeout, a body that is not Stripe's JSON) | [`Unknown`](SinkError::Unknown) |
///
/// "Already exists" is proof of delivery when identifiers are unique per store: each store
/// draws its own namespace ([`ExportStore::identifier_namespace`](crate::store::ExportStore::identifier_namespace)).
///
/// async-stripe 1.0 does not expose response headers, so a `Retry-After` from Stripe cannot
/// be read here; the exporter's backoff (2 s doubling to an hour, with jitter) applies.
pub struct StripeSink {
    client: stripe::Client,
    timeout: Duration,
    /// Active meter ids by event name, read from `GET /v1/billing/meters?status=active` when
    /// one is missing or the list is older than [`METERS_KEPT`], and when it was read.
    meters: std::sync::Mutex<(HashMap<String, String>, Option<std::time::Instant>)>,
    /// The reads async-stripe cannot make (event summaries grouped by dimension).
    reader: super::reader::StripeReader,
}

impl fmt::Debug for StripeSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeSink").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl StripeSink {
    /// A sink calling Stripe with this secret key; `api_base` replaces
    /// `https://api.stripe.com/` (a local stand-in, a proxy).
    ///
    /// # Errors
    /// The client cannot be built.
    pub fn new(secret_key: &Secret, api_base: Option<&str>, timeout: Duration) -> Result<Self, StripeSetupError> {
        let mut builder = stripe::ClientBuilder::new(secret_key.expose()).timeout(timeout);
        if let Some(base) = api_base {
            builder = builder.url(base);
        }
        let client = builder.build().map_err(|e| StripeSetupError::Client(e.to_string()))?;
        let reader = super::reader::StripeReader::new(secret_key.clone(), api_base, timeout);
        Ok(Self { client, timeout, meters: std::sync::Mutex::new((HashMap::new(), None)), reader })
    }

    /// The sink the configuration's `[stripe]` section describes, with the secret key from
    /// `stripe.secret_key_file` or `STRIPE_SECRET_KEY`.
    ///
    /// # Errors
    /// No `[stripe]` section, no secret key, or the client cannot be built.
    pub fn from_config(config: &Config) -> Result<Self, StripeSetupError> {
        let settings = config
            .stripe()
            .ok_or(StripeSetupError::MissingSecret { env: "STRIPE_SECRET_KEY", file_key: "secret_key_file" })?;
        let key = read_secrets(settings.secret_key_file.as_deref(), "STRIPE_SECRET_KEY", "secret_key_file")?;
        Self::new(&key[0], settings.api_base.as_deref(), settings.timeout)
    }
}

#[async_trait]
impl BillingSink for StripeSink {
    async fn send(&self, event: &MeterEvent) -> Result<(), SinkError> {
        let Some(customer) = &event.customer else {
            return Err(SinkError::Permanent("the tenant has no Stripe customer".into()));
        };
        let mut payload = HashMap::from([
            ("stripe_customer_id".to_owned(), customer.clone()),
            ("value".to_owned(), event.value.to_string()),
        ]);
        // A series' values, under the keys its Stripe meter lists in `dimension_payload_keys`.
        payload.extend(event.dimensions.iter().cloned());
        let key = IdempotencyKey::new(&event.identifier).map_err(|e| SinkError::Permanent(e.to_string()))?;
        let request = CreateBillingMeterEvent::new(event.event_name.as_str(), payload)
            .identifier(event.identifier.as_str())
            .timestamp(event.timestamp);
        let result = stripe::StripeRequest::customize(&request)
            .request_strategy(RequestStrategy::Idempotent(key))
            .timeout(self.timeout)
            .send(&self.client)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => classify(e),
        }
    }

    fn needs_customer(&self) -> bool {
        crate::base::SinkKind::Stripe.needs_customer()
    }

    fn reads_back(&self) -> bool {
        true
    }

    /// `GET /v1/billing/meters/{id}/event_summaries` with `value_grouping_window=hour`, paged;
    /// the meter's id from `GET /v1/billing/meters` by its event name.
    async fn held_by_hour(
        &self,
        event_name: &str,
        customer: &str,
        from: i64,
        to: i64,
    ) -> Result<Option<std::collections::BTreeMap<i64, f64>>, SinkError> {
        use stripe_billing::billing_meter_event_summary::{
            ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow as Grouping,
        };
        let id = self.meter_id(event_name).await?;
        let mut out = std::collections::BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let mut request = ListIdBillingMeterEventSummary::new(id.as_str(), customer, to, from)
                .value_grouping_window(Grouping::Hour)
                .limit(100);
            if let Some(after) = &after {
                request = request.starting_after(after.as_str());
            }
            let page = match stripe::StripeRequest::customize(&request).timeout(self.timeout).send(&self.client).await {
                Ok(page) => page,
                Err(e) => return classify(e).map(|()| None),
            };
            for summary in &page.data {
                *out.entry(summary.start_time).or_insert(0.0) += summary.aggregated_value;
            }
            match page.data.last() {
                Some(last) if page.has_more => after = Some(last.id.as_str().to_owned()),
                _ => break,
            }
        }
        Ok(Some(out))
    }

    fn reads_back_by_values(&self) -> bool {
        true
    }

    /// `GET /v1/billing/meters/{id}/event_summaries` with `value_grouping_window=hour` and
    /// `dimension_group_by_keys` (Stripe's API reference, "List billing meter event
    /// summaries": "List of dimension payload keys to group by"; each summary's `dimensions`:
    /// "Key-value pairs of dimension values for event summaries with grouping on
    /// dimensions"), paged. async-stripe does not know the parameter: read as JSON.
    async fn held_by_hour_and_values(
        &self,
        event_name: &str,
        customer: &str,
        keys: &[String],
        from: i64,
        to: i64,
    ) -> Result<Option<super::HeldByValues>, SinkError> {
        // No such meter is no refusal of the grouping: left for the next pass, not read again
        // as a total.
        let id = self.meter_id(event_name).await.map_err(|e| match e {
            SinkError::Permanent(why) => SinkError::Unknown(why.into()),
            e => e,
        })?;
        // Percent-encoded but for RFC 3986's unreserved characters.
        let encode = |s: &str| {
            s.bytes().fold(String::with_capacity(s.len()), |mut out, b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(b));
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
                out
            })
        };
        let mut query = format!(
            "customer={}&start_time={from}&end_time={to}&value_grouping_window=hour&limit=100",
            encode(customer)
        );
        for (i, key) in keys.iter().enumerate() {
            query.push_str(&format!("&dimension_group_by_keys%5B{i}%5D={}", encode(key)));
        }
        let mut out = super::HeldByValues::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("v1/billing/meters/{}/event_summaries?{query}", encode(&id));
            if let Some(after) = &after {
                path.push_str(&format!("&starting_after={}", encode(after)));
            }
            let page = self.reader.get(&path).await.map_err(|e| match (e.refused, e.status) {
                // The key (401, 403) or the address (404): every read would get it.
                (Some(lacking), _) => SinkError::Halt(format!("{}: the key needs {lacking}", e.why)),
                // The parameters refused (an account or API version without grouping by
                // dimension): reconciliation compares the meter's total instead.
                (None, Some(400)) => SinkError::Permanent(e.why),
                (None, _) => SinkError::Unknown(e.why.into()),
            })?;
            // A list, or not Stripe's answer (a proxy's page): never read as "holds nothing".
            let Some(data) = page["data"].as_array().filter(|_| page["object"] == "list") else {
                return Err(SinkError::Unknown(format!("not a list of meter event summaries: {page}").into()));
            };
            for summary in data {
                let (Some(start), Some(value)) = (summary["start_time"].as_i64(), summary["aggregated_value"].as_f64())
                else {
                    return Err(SinkError::Unknown(
                        format!("a meter event summary without a start or a value: {summary}").into(),
                    ));
                };
                let values = keys
                    .iter()
                    .map(|k| summary["dimensions"][k.as_str()].as_str().unwrap_or_default().to_owned())
                    .collect();
                *out.entry((values, start)).or_insert(0.0) += value;
            }
            match data.last().and_then(|s| s["id"].as_str()) {
                Some(last) if page["has_more"].as_bool() == Some(true) => after = Some(last.to_owned()),
                _ => break,
            }
        }
        Ok(Some(out))
    }
}

impl StripeSink {
    /// The id of the active meter named `event_name`: from the cache, else read from Stripe's
    /// list of active meters. Two active meters with one event name are refused: which one
    /// Stripe counts an event in cannot be told, and reading the wrong one would make every
    /// hour look lost.
    async fn meter_id(&self, event_name: &str) -> Result<String, SinkError> {
        use stripe_billing::billing_meter::ListBillingMeter;
        use stripe_billing::BillingMeterStatus;
        {
            let cache = self.meters.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some(id), Some(at)) = (cache.0.get(event_name), cache.1) {
                if at.elapsed() < METERS_KEPT {
                    return Ok(id.clone());
                }
            }
        }
        let mut found: HashMap<String, String> = HashMap::new();
        let mut twice: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut request = ListBillingMeter::new().status(BillingMeterStatus::Active).limit(100);
            if let Some(after) = &after {
                request = request.starting_after(after.as_str());
            }
            let page = match stripe::StripeRequest::customize(&request).timeout(self.timeout).send(&self.client).await {
                Ok(page) => page,
                Err(e) => return classify(e).map(|()| String::new()),
            };
            for meter in &page.data {
                if found.insert(meter.event_name.clone(), meter.id.as_str().to_owned()).is_some() {
                    twice.push(meter.event_name.clone());
                }
            }
            match page.data.last() {
                Some(last) if page.has_more => after = Some(last.id.as_str().to_owned()),
                _ => break,
            }
        }
        for name in &twice {
            found.remove(name);
        }
        let id = found.get(event_name).cloned();
        *self.meters.lock().unwrap_or_else(|e| e.into_inner()) = (found, Some(std::time::Instant::now()));
        if twice.iter().any(|n| n == event_name) {
            return Err(SinkError::Permanent(format!(
                "Stripe has two active meters with the event name `{event_name}`: deactivate one"
            )));
        }
        id.ok_or_else(|| SinkError::Permanent(format!("Stripe has no active meter with the event name `{event_name}`")))
    }
}

/// How long the list of Stripe's meters is kept before it is read again.
const METERS_KEPT: Duration = Duration::from_secs(3600);

/// The start of Stripe's answer to a meter event whose identifier it already holds: 400
/// `invalid_request_error`, without a `code` (reported by integrators, e.g.
/// langfuse/langfuse#16292).
const ALREADY_EXISTS: &str = "An event already exists with identifier";

fn classify(e: StripeError) -> Result<(), SinkError> {
    match e {
        StripeError::Stripe(err, status) => {
            let message = err.message.clone().unwrap_or_default();
            let code = err.code.as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default();
            if code == "resource_already_exists" || (status == 400 && message.starts_with(ALREADY_EXISTS)) {
                // Stripe holds an event under this identifier: the exporter judges by the
                // store's namespace whether it is this revision's.
                return Err(SinkError::AlreadyHeld(message));
            }
            let detail = format!("{status} {code}: {message}");
            match status {
                // Refused without being executed: rate limited.
                429 => Err(SinkError::NotTaken { source: detail.into(), retry_after: None }),
                // A 409 may be a request with this key still executing: it may be taken.
                408 | 409 | 424 | 500..=599 => Err(SinkError::Retryable { source: detail.into(), retry_after: None }),
                // The key refused, or an address that is not Stripe's API (every call would get
                // it): nothing is parked.
                401 | 403 | 404 => Err(SinkError::Halt(detail)),
                // The key was used with other parameters: Stripe holds something under it.
                400 if err.type_ == stripe::ApiErrorsType::IdempotencyError => {
                    Err(SinkError::Unsettled(format!("{status} idempotency_error: {message}")))
                }
                _ => Err(SinkError::Permanent(detail)),
            }
        }
        // hyper's client reports a failure to connect (name lookup, TCP, TLS) as
        // "client error (Connect)": the request never left this machine.
        StripeError::ClientError(m) if m.contains("(Connect)") => {
            Err(SinkError::NotTaken { source: m.into(), retry_after: None })
        }
        other => Err(SinkError::Unknown(Box::new(other))),
    }
}
