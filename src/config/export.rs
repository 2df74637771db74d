//! `[export]`: the export of closed usage windows to the billing sink.

use std::time::Duration;

use serde::Deserialize;

use super::validator::Validator;
use super::ConfigError;
use crate::base::SinkKind;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
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

/// Whether `url` is the scheme and the host (with a port) only: the clients append `v1/…` to
/// it, so a path (`…/v1`) makes every call a 404.
pub(super) fn host_only(url: &str) -> bool {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| {
        let host = r.strip_suffix('/').unwrap_or(r);
        !host.is_empty() && !host.contains(['/', '?', '#', ' '])
    })
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

impl Validator<'_, '_> {
    /// `[export]`.
    pub(super) fn export(&self, raw: &RawExport) -> Result<ExportSettings, ConfigError> {
        let d = ExportSettings::default();
        let count = |path: &str, v: Option<u64>, default: u64, max: u64| -> Result<u64, ConfigError> {
            match v {
                None => Ok(default),
                Some(n) if (1..=max).contains(&n) => Ok(n),
                Some(n) => Err(self.invalid(path, format!("must be between 1 and {max}, not {n}"))),
            }
        };
        let export = ExportSettings {
            interval: self.duration("export.interval", raw.interval.as_deref(), d.interval)?,
            concurrency: count("export.concurrency", raw.concurrency, d.concurrency as u64, 1000)? as usize,
            // Stripe takes 1,000 calls/s in live mode (100 in test mode).
            calls_per_second: count(
                "export.calls_per_second",
                raw.calls_per_second,
                u64::from(d.calls_per_second),
                1000,
            )? as u32,
            claim: self.duration("export.claim", raw.claim.as_deref(), d.claim)?,
            // With Metronome, as long as its de-duplication allows: an export in doubt is sent
            // again under its transaction id for 33 days before it is parked.
            unconfirmed_after: self.duration(
                "export.unconfirmed_after",
                raw.unconfirmed_after.as_deref(),
                if raw.sink.as_deref() == Some("metronome") {
                    crate::base::SinkLimits::METRONOME.max_unconfirmed
                } else {
                    d.unconfirmed_after
                },
            )?,
            max_unknown_failures: count("export.max_unknown_failures", raw.max_unknown_failures, 8, 1000)? as u32,
            reconcile_after: self.duration(
                "export.reconcile_after",
                raw.reconcile_after.as_deref(),
                d.reconcile_after,
            )?,
            reconcile_interval: self.duration_or_zero(
                "export.reconcile_interval",
                raw.reconcile_interval.as_deref(),
                d.reconcile_interval,
            )?,
            sink: match raw.sink.as_deref() {
                None => None,
                Some("stripe") => Some(SinkKind::Stripe),
                Some("metronome") => Some(SinkKind::Metronome),
                Some("jsonl") => Some(SinkKind::Jsonl),
                Some(other) => {
                    return Err(self.invalid(
                        "export.sink",
                        format!("`{other}` is not a billing sink: expected \"stripe\", \"metronome\" or \"jsonl\""),
                    ))
                }
            },
            file: match raw.file.as_deref() {
                Some(p) if p.trim().is_empty() => return Err(self.invalid("export.file", "must not be empty")),
                p => p.map(std::path::PathBuf::from),
            },
        };
        if export.reconcile_after < Duration::from_secs(60) || export.reconcile_after > Duration::from_secs(7 * 86_400)
        {
            return Err(self.invalid(
                "export.reconcile_after",
                "must be between 1 minute and 7 days: Stripe's summaries settle in minutes, and what is exported \
                 is kept 35 days",
            ));
        }
        if !export.reconcile_interval.is_zero() && export.reconcile_interval < Duration::from_secs(60) {
            return Err(self.invalid("export.reconcile_interval", "must be 0 (off) or at least 1 minute"));
        }
        if export.sink == Some(SinkKind::Metronome) {
            if export.unconfirmed_after > crate::base::SinkLimits::METRONOME.max_unconfirmed {
                return Err(self.invalid(
                    "export.unconfirmed_after",
                    "must be at most 33 days: Metronome de-duplicates transaction ids over 34 days only, so a \
                     later re-send could be billed twice",
                ));
            }
        } else if export.unconfirmed_after > crate::base::SinkLimits::STRIPE.max_unconfirmed {
            return Err(self.invalid(
                "export.unconfirmed_after",
                "must be at most 23 hours: Stripe de-duplicates meter event identifiers over about 24 hours only, \
                 so a later re-send could be billed twice",
            ));
        }
        match (export.sink, &export.file) {
            (Some(SinkKind::Jsonl), None) => {
                return Err(self.invalid("export.sink", "\"jsonl\" needs export.file, the file events are appended to"))
            }
            (Some(SinkKind::Jsonl), Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(self.invalid("export.file", "is the file of export.sink = \"jsonl\" only"));
            }
        }
        Ok(export)
    }
}
