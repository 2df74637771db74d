//! `[meters.<name>]`: what is counted.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{validator::check_name, validator::Validator};
use super::{ConfigError, ConfigErrorKind as Kind};
use crate::base::MeterId;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMeter {
    pub(crate) description: Option<String>,
    pub(crate) export: Option<bool>,
    pub(crate) event_name: Option<String>,
    pub(crate) aggregation: Option<String>,
    pub(crate) price: Option<String>,
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
    /// Its price per unit, a decimal of the currency (`price`).
    pub(crate) price: Option<rust_decimal::Decimal>,
}

impl MeterSpec {
    /// Whether the meter's usage is exported to the billing sink (`export`, `true` by
    /// default). A meter that is not (a prepaid balance's, paid for up front) is counted,
    /// limited and reported all the same; its pending windows are parked as never exported.
    #[must_use]
    pub fn exported(&self) -> bool {
        self.export
    }

    /// Its price per unit (`price`, a decimal of `[billing] currency`): every unit of it feeds
    /// the spend of plans with a spend cap. A plan or a tenant override may set its own.
    #[must_use]
    pub fn price(&self) -> Option<rust_decimal::Decimal> {
        self.price
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

impl Validator<'_, '_> {
    /// A reference to a declared meter.
    pub(super) fn meter_ref(&self, meters: &[MeterSpec], path: &str, name: &str) -> Result<MeterId, ConfigError> {
        match meters.iter().find(|m| m.id.as_str() == name) {
            Some(m) => Ok(m.id.clone()),
            None => Err(self.loc.error(
                Kind::UnknownReference,
                path,
                format!("unknown meter `{name}`: declare it under [meters]"),
            )),
        }
    }

    /// `[meters]`: `requests` always exists; with `[billing]`, the meter `spend` too (the
    /// money priced meters feed, never exported).
    pub(super) fn meters(
        &self,
        raw: &BTreeMap<String, RawMeter>,
        billing: &super::BillingSettings,
    ) -> Result<Vec<MeterSpec>, ConfigError> {
        let mut meters = vec![MeterSpec {
            id: "requests".into(),
            event_name: "requests".into(),
            description: None,
            aggregation: MeterAggregation::Sum,
            export: true,
            price: None,
        }];
        for (name, m) in raw {
            let path = format!("meters.{name}");
            check_name(self, &path, name)?;
            if name == crate::base::SPEND_METER {
                return Err(self.invalid(
                    &path,
                    "`spend` is the reserved meter of money (what priced meters cost): name this meter otherwise",
                ));
            }
            let price = match &m.price {
                None => None,
                Some(text) => Some(self.price(&format!("{path}.price"), text, billing)?),
            };
            if m.event_name.as_deref().is_some_and(|e| e.trim().is_empty()) {
                return Err(self.invalid(
                    &format!("{path}.event_name"),
                    "must not be empty: it names the meter's events for billing (leave it out to use the meter's name)",
                ));
            }
            let aggregation = match m.aggregation.as_deref() {
                None | Some("sum") => MeterAggregation::Sum,
                Some("hour") => MeterAggregation::Hour,
                Some("day") => MeterAggregation::Day,
                Some(other) => {
                    return Err(self.invalid(
                        &format!("{path}.aggregation"),
                        format!(
                            "`{other}` is not an aggregation: expected \"sum\" (the default), or \"hour\" / \"day\" \
                             for a Stripe meter pre-aggregated with that event_time_window"
                        ),
                    ))
                }
            };
            let spec = MeterSpec {
                id: name.as_str().into(),
                event_name: m.event_name.clone().unwrap_or_else(|| name.clone()),
                description: m.description.clone(),
                aggregation,
                export: m.export.unwrap_or(true),
                price,
            };
            // Stripe's limit for a meter's event_name.
            if spec.event_name.chars().count() > 100 {
                return Err(self.invalid(
                    &format!("{path}.event_name"),
                    "is longer than 100 characters, which Stripe refuses for a meter's event_name",
                ));
            }
            if name == "requests" {
                meters[0] = spec;
            } else {
                meters.push(spec);
            }
        }
        if billing.currency.is_some() {
            // Money is never billed as units: the billing system bills the priced meters.
            meters.push(MeterSpec {
                id: crate::base::SPEND_METER.into(),
                event_name: crate::base::SPEND_METER.into(),
                description: Some("spend: what priced meters cost, in nano-units of the currency".into()),
                aggregation: MeterAggregation::Sum,
                export: false,
                price: None,
            });
        }
        if meters.len() > 64 {
            return Err(self.invalid("meters", "at most 64 meters may be declared (with `spend` under [billing])"));
        }
        // One Stripe meter per event_name: two meters sending one would be billed as one.
        let explicit = |m: &MeterSpec| raw.get(m.id.as_str()).is_some_and(|r| r.event_name.is_some());
        for (j, b) in meters.iter().enumerate() {
            if let Some(a) = meters[..j].iter().find(|a| a.event_name == b.event_name) {
                // Named at the key that says it (a meter's name is its event_name by default).
                let (at, other) = if explicit(b) || !explicit(a) { (b, a) } else { (a, b) };
                let key =
                    if explicit(at) { format!("meters.{}.event_name", at.id) } else { format!("meters.{}", at.id) };
                return Err(self.invalid(
                    &key,
                    format!(
                        "event_name `{}` is also meters.{}'s: each meter needs its own Stripe meter (event_name)",
                        b.event_name, other.id
                    ),
                ));
            }
        }
        Ok(meters)
    }
}
