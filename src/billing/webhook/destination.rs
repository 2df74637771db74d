//! An event destination's thin events: Stripe's meter errors, fetched in full, logged, counted
//! and their window reconciled.

use std::{fmt, sync::Arc};

use super::outcome::WebhookOutcome;
use crate::billing::{reader::StripeReader, Secret};
use crate::store::DirectoryEvents;

impl Destination {
    /// A verified thin event: a meter error is fetched in full, logged, counted, and its window
    /// reconciled (`node` told); a redelivery of one handled here is a duplicate.
    pub(super) async fn receive(&self, thin: Thin, node: &dyn DirectoryEvents) -> WebhookOutcome {
        let destination = self;
        if !METER_ERRORS.contains(&thin.kind.as_str()) {
            tracing::info!(event = %thin.id, kind = %thin.kind, "Stripe thin event ignored: not a meter error");
            return WebhookOutcome::Ignored;
        }
        if !destination.first_time(&thin.id) {
            return WebhookOutcome::Duplicate;
        }
        let created = chrono::DateTime::parse_from_rfc3339(&thin.created).ok().map(|t| t.timestamp());
        match destination.fetch(&thin.id).await {
            Ok(full) => {
                let report = MeterErrorReport::of(&full);
                tracing::error!(event = %thin.id, kind = %thin.kind, created = %thin.created,
                    meter = ?thin.related, errors = report.errors, codes = ?report.codes, identifiers = ?report.identifiers,
                    summary = %report.summary, from = ?report.window.map(|w| w.0), to = ?report.window.map(|w| w.1),
                    "Stripe refused meter events after taking them: fix the cause (the customer, the meter); \
                     reconciliation finds them lacking and sends them again once proven");
                if let Some((from, to)) = report.window.or(created.map(|c| (c, c))) {
                    node.meter_error(from, to);
                }
                WebhookOutcome::MeterError { kind: thin.kind, errors: report.errors }
            }
            Err(why) => {
                tracing::error!(event = %thin.id, kind = %thin.kind, created = %thin.created, error = %why,
                    "Stripe reported a meter error; its full event could not be read (GET /v2/core/events): \
                     see it in the Dashboard (Workbench, Events)");
                // The thin event's own time stands for the window.
                if let Some(c) = created {
                    node.meter_error(c, c);
                }
                WebhookOutcome::MeterError { kind: thin.kind, errors: 0 }
            }
        }
    }
}

/// Stripe's meter error events (thin events).
const METER_ERRORS: [&str; 2] = ["v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"];

/// An event destination: its signing secrets, how to read a full event, and the thin events
/// handled lately (a redelivery is a duplicate).
pub(super) struct Destination {
    pub(super) secrets: Vec<Secret>,
    pub(super) reader: Option<Arc<StripeReader>>,
    pub(super) seen: std::sync::Mutex<std::collections::VecDeque<String>>,
}

/// How many thin event ids a handler remembers.
const THIN_SEEN: usize = 1024;

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination").field("secrets", &self.secrets.len()).finish_non_exhaustive()
    }
}

impl Destination {
    /// Whether this thin event id is new to this handler (remembered among the last
    /// [`THIN_SEEN`]).
    fn first_time(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.iter().any(|s| s == id) {
            return false;
        }
        if seen.len() >= THIN_SEEN {
            seen.pop_front();
        }
        seen.push_back(id.to_owned());
        true
    }

    /// `GET /v2/core/events/{id}`.
    async fn fetch(&self, id: &str) -> Result<serde_json::Value, String> {
        let reader = self.reader.as_ref().ok_or("no Stripe secret key to read it with")?;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`{id}` is not an event id"));
        }
        reader.get(&format!("v2/core/events/{id}")).await.map_err(|e| e.why)
    }
}

/// What a thin event says: its id, type, time (an RFC 3339 string) and related object.
#[derive(Debug)]
pub(super) struct Thin {
    id: String,
    kind: String,
    created: String,
    related: Option<String>,
}

/// Whether the envelope says it is a thin event: its top-level `object` is `v2.core.event`
/// (a snapshot event's is `event`). Only that field is read; any other, at any depth, is
/// skipped.
pub(super) fn is_thin(payload: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow, default)]
        object: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Envelope<'_>>(payload).is_ok_and(|e| e.object.as_deref() == Some("v2.core.event"))
}

/// A thin event (`"object": "v2.core.event"`), if the payload is one.
pub(super) fn thin_event(payload: &str) -> Option<Thin> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    if v["object"].as_str() != Some("v2.core.event") {
        return None;
    }
    Some(Thin {
        id: v["id"].as_str().unwrap_or_default().to_owned(),
        kind: v["type"].as_str().unwrap_or_default().to_owned(),
        created: v["created"].as_str().unwrap_or_default().to_owned(),
        related: v["related_object"]["id"].as_str().map(str::to_owned),
    })
}

/// What a full meter error event reports: the validation window, the count, the error codes
/// and sample identifiers.
#[derive(Debug, Default)]
struct MeterErrorReport {
    window: Option<(i64, i64)>,
    errors: u64,
    codes: Vec<String>,
    identifiers: Vec<String>,
    summary: String,
}

impl MeterErrorReport {
    fn of(full: &serde_json::Value) -> Self {
        let data = &full["data"];
        let time = |k: &str| {
            data[k].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.timestamp())
        };
        let mut report = Self {
            window: time("validation_start").zip(time("validation_end")),
            errors: data["reason"]["error_count"].as_u64().unwrap_or(0),
            summary: data["developer_message_summary"].as_str().unwrap_or_default().to_owned(),
            ..Self::default()
        };
        for t in data["reason"]["error_types"].as_array().into_iter().flatten().take(20) {
            report.codes.extend(t["code"].as_str().map(str::to_owned));
            for e in t["sample_errors"].as_array().into_iter().flatten().take(5) {
                report.identifiers.extend(e["request"]["identifier"].as_str().map(str::to_owned));
            }
        }
        report
    }
}
