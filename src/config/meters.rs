//! `[meters.<name>]`: what is counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;

use super::dimensions::{parse_selector, selector_id, MeterDimensions, OPEN_POSITION};
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
    /// The meter's dimensions (`["model", "kind"]`), in the order selectors and prices nest.
    pub(crate) dimensions: Option<Vec<String>>,
    /// Each dimension's closed list of values.
    #[serde(default)]
    pub(crate) values: BTreeMap<String, Vec<String>>,
    /// What a value a list lacks, or a missing one, does: `refuse` or `other`.
    pub(crate) on_unknown: Option<String>,
    /// An open dimension: the most values a tenant may use in a month.
    pub(crate) max_values: Option<BTreeMap<String, u32>>,
    /// Prices per series, nested in the dimensions' order.
    pub(crate) prices: Option<toml::Value>,
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
    /// A meter with dimensions: its dimensions (on the meter itself, the total of its series).
    pub(crate) dimensions: Option<Arc<MeterDimensions>>,
    /// A series or a selector: the meter with dimensions it counts for.
    pub(crate) of: Option<MeterId>,
    /// A series' or a selector's values, in the dimensions' order.
    pub(crate) values: Box<[(Box<str>, Box<str>)]>,
    /// A series (a value of every dimension), not a selector.
    pub(crate) series: bool,
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

    /// The meter's dimensions, for a meter declared with them (the total of its series).
    #[must_use]
    pub fn dimensions(&self) -> Option<&MeterDimensions> {
        self.dimensions.as_deref()
    }

    /// For a series (`tokens{model=m-large,kind=output}`) or a selector (`tokens{model=m-large}`)
    /// of a meter with dimensions: that meter.
    #[must_use]
    pub fn series_of(&self) -> Option<&MeterId> {
        self.of.as_ref()
    }

    /// A series' or a selector's values, in the order its meter declares its dimensions (none
    /// for another meter).
    pub fn values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(n, v)| (&**n, &**v))
    }

    /// Whether this is a series: a meter with dimensions' count at one value of each, the unit
    /// that is priced and billed.
    #[must_use]
    pub fn is_series(&self) -> bool {
        self.series
    }

    fn plain(id: &str, event_name: &str) -> Self {
        Self {
            id: id.into(),
            event_name: event_name.into(),
            description: None,
            aggregation: MeterAggregation::Sum,
            export: true,
            price: None,
            dimensions: None,
            of: None,
            values: Box::new([]),
            series: false,
        }
    }
}

impl Validator<'_, '_> {
    /// A reference to a declared meter.
    /// A selector (`tokens{model=m-large}`) names the series or the selector of a meter with
    /// dimensions, its pairs in any order.
    pub(super) fn meter_ref(&self, meters: &[MeterSpec], path: &str, name: &str) -> Result<MeterId, ConfigError> {
        if let Some(parsed) = parse_selector(name) {
            let bad = |why: String| self.loc.error(Kind::InvalidValue, path, format!("selector `{name}`: {why}"));
            let (meter, pairs) = parsed.map_err(bad)?;
            let Some(total) = meters.iter().find(|m| m.id.as_str() == meter) else {
                return Err(self.loc.error(
                    Kind::UnknownReference,
                    path,
                    format!("unknown meter `{meter}`: declare it under [meters]"),
                ));
            };
            let Some(dims) = total.dimensions() else {
                return Err(bad(format!("the meter `{meter}` has no dimensions")));
            };
            let values = canonical(dims, &pairs).map_err(bad)?;
            let id = selector_id(meter, values.iter().copied());
            return match meters.iter().find(|m| m.id.as_str() == id) {
                Some(m) => Ok(m.id.clone()),
                None => Err(bad(
                    "a selector over some of a meter's dimensions is counted only when a plan or a tenant of the \
                     file limits it"
                        .into(),
                )),
            };
        }
        match meters.iter().find(|m| m.id.as_str() == name) {
            Some(m) => Ok(m.id.clone()),
            None => Err(self.loc.error(
                Kind::UnknownReference,
                path,
                format!("unknown meter `{name}`: declare it under [meters]"),
            )),
        }
    }

    /// `id` at `path` is counted there alone (a route's meter or hold, the default meter, a
    /// usage event's product): not a meter with dimensions, a series or a selector, which
    /// count together through a handler's records and holds.
    pub(super) fn counted_alone(&self, meters: &[MeterSpec], path: &str, id: &MeterId) -> Result<(), ConfigError> {
        match meters.iter().find(|m| m.id == *id) {
            Some(m) if m.dimensions.is_some() || m.of.is_some() => Err(self.invalid(
                path,
                format!(
                    "`{id}` has dimensions: it is counted through a handler's `record_with` and `hold_in`, \
                     which name the values, or held by a route at the values `hold_values` reads \
                     (list it in `reports`)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// `[meters]`: `requests` always exists; with `[billing]`, the meter `spend` too (the
    /// money priced meters feed, never exported).
    pub(super) fn meters(
        &self,
        raw: &BTreeMap<String, RawMeter>,
        selectors: &BTreeSet<String>,
        billing: &super::BillingSettings,
    ) -> Result<Vec<MeterSpec>, ConfigError> {
        let mut meters = vec![MeterSpec::plain("requests", "requests")];
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
            let dimensions = match &m.dimensions {
                None => {
                    for (key, set) in [
                        ("values", !m.values.is_empty()),
                        ("on_unknown", m.on_unknown.is_some()),
                        ("max_values", m.max_values.is_some()),
                    ] {
                        if set {
                            return Err(self.invalid(&format!("{path}.{key}"), "only a meter with `dimensions` has it"));
                        }
                    }
                    if m.prices.is_some() {
                        return Err(self.invalid(
                            &format!("{path}.prices"),
                            "a meter without dimensions has one `price`: prices per value need `dimensions`",
                        ));
                    }
                    None
                }
                Some(names) => {
                    if m.price.is_some() {
                        return Err(self.invalid(
                            &format!("{path}.price"),
                            "a meter with dimensions is priced per series, under `prices` (nested in the \
                             dimensions' order, with a `default` at any level)",
                        ));
                    }
                    if matches!(m.aggregation.as_deref(), Some("hour" | "day")) {
                        return Err(self.invalid(
                            &format!("{path}.aggregation"),
                            "a meter with dimensions is exported as a sum (pre-aggregated windows per series are \
                             not supported)",
                        ));
                    }
                    let open = m.max_values.clone().unwrap_or_default();
                    let dims = self.dimensions(&path, names, &m.values, &open, m.on_unknown.as_deref())?;
                    if let Some(prices) = &m.prices {
                        self.check_price_keys(&format!("{path}.prices"), &dims, prices, 0)?;
                    }
                    Some(Arc::new(dims))
                }
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
                // A meter with dimensions is billed by its series: its total records no usage
                // of its own, and windows pending from before it had dimensions export as
                // they were.
                export: m.export.unwrap_or(true),
                price,
                dimensions: dimensions.clone(),
                of: None,
                values: Box::new([]),
                series: false,
            };
            // Stripe's limit for a meter's event_name.
            if spec.event_name.chars().count() > 100 {
                return Err(self.invalid(
                    &format!("{path}.event_name"),
                    "is longer than 100 characters, which Stripe refuses for a meter's event_name",
                ));
            }
            let series = match &dimensions {
                None => Vec::new(),
                Some(dims) => self.series(&path, &spec, dims, m, selectors, billing)?,
            };
            if name == "requests" {
                meters[0] = spec;
            } else {
                meters.push(spec);
            }
            meters.extend(series);
        }
        if billing.currency.is_some() {
            // Money is never billed as units: the billing system bills the priced meters.
            meters.push(MeterSpec {
                description: Some("spend: what priced meters cost, in nano-units of the currency".into()),
                export: false,
                ..MeterSpec::plain(crate::base::SPEND_METER, crate::base::SPEND_METER)
            });
        }
        if meters.len() > 64 {
            return Err(self.invalid(
                "meters",
                format!(
                    "at most 64 meters may be declared (with `spend` under [billing], each series of a meter with \
                     dimensions and each selector plans limit): these make {}",
                    meters.len()
                ),
            ));
        }
        // Each policy a header may name is one meter's (`tokens-m-large` is the selector
        // `tokens{model=m-large}`'s, or a meter of that name's).
        for (j, b) in meters.iter().enumerate() {
            let name = crate::base::policy_name(b.id.as_str());
            if let Some(a) = meters[..j].iter().find(|a| crate::base::policy_name(a.id.as_str()) == name) {
                return Err(self.invalid(
                    "meters",
                    format!(
                        "`{}` and `{}` would both be named `{name}` in rate-limit headers: rename a meter or a value",
                        a.id, b.id
                    ),
                ));
            }
        }
        // One Stripe meter per event_name: two meters sending one would be billed as one.
        let explicit = |m: &MeterSpec| raw.get(m.id.as_str()).is_some_and(|r| r.event_name.is_some());
        // (A meter with dimensions shares its event_name with its series, billed in their stead.)
        for (j, b) in meters.iter().enumerate().filter(|(_, m)| m.of.is_none()) {
            if let Some(a) = meters[..j].iter().find(|a| a.of.is_none() && a.event_name == b.event_name) {
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

impl Validator<'_, '_> {
    /// The series of the meter `total` with dimensions `dims` (every combination of values,
    /// priced from `prices`), then the selectors among `selectors` that name some of its
    /// dimensions and not all.
    fn series(
        &self,
        path: &str,
        total: &MeterSpec,
        dims: &MeterDimensions,
        raw: &RawMeter,
        selectors: &BTreeSet<String>,
        billing: &super::BillingSettings,
    ) -> Result<Vec<MeterSpec>, ConfigError> {
        let name = total.id.as_str();
        let n = dims.series();
        if n > 64 {
            return Err(self.invalid(
                &format!("{path}.values"),
                format!("these lists make {n} series (one per combination of values): at most 64 meters in all"),
            ));
        }
        let mut out = Vec::with_capacity(n);
        for offset in 0..n {
            let values = dims.values_at(offset);
            let price = match &raw.prices {
                None => None,
                Some(prices) => match self.series_price(path, prices, &values, billing)? {
                    Some(p) => Some(p),
                    None => {
                        let which: Vec<String> = values
                            .iter()
                            .map(|(n, v)| match *v {
                                OPEN_POSITION => format!("{n}=* (the values not listed)"),
                                v => format!("{n}={v}"),
                            })
                            .collect();
                        return Err(self.invalid(
                            &format!("{path}.prices"),
                            format!(
                                "no price for {}: price it, or give a `default` at its level (a meter with prices \
                                 prices every series, never at a silent zero)",
                                which.join(", ")
                            ),
                        ));
                    }
                },
            };
            out.push(MeterSpec {
                id: selector_id(name, values.iter().copied()).into(),
                event_name: total.event_name.clone(),
                description: total.description.clone(),
                aggregation: MeterAggregation::Sum,
                export: raw.export.unwrap_or(true),
                price,
                dimensions: None,
                of: Some(total.id.clone()),
                values: values.iter().map(|(n, v)| (Box::from(*n), Box::from(*v))).collect(),
                series: true,
            });
        }
        // The selectors plans limit: counted apart, never billed.
        for text in selectors {
            let Some(Ok((meter, pairs))) = parse_selector(text) else { continue };
            if meter != name {
                continue;
            }
            let Ok(values) = canonical(dims, &pairs) else { continue };
            if values.len() == dims.names.len() {
                continue; // a series
            }
            let id = selector_id(name, values.iter().copied());
            if out.iter().any(|m| m.id.as_str() == id) {
                continue;
            }
            out.push(MeterSpec {
                id: id.into(),
                event_name: total.event_name.clone(),
                description: None,
                aggregation: MeterAggregation::Sum,
                export: false,
                price: None,
                dimensions: None,
                of: Some(total.id.clone()),
                values: values.iter().map(|(n, v)| (Box::from(*n), Box::from(*v))).collect(),
                series: false,
            });
        }
        Ok(out)
    }
}

/// A selector's pairs in the order `dims` declares them, each dimension and value checked.
pub(crate) fn canonical<'a>(
    dims: &'a MeterDimensions,
    pairs: &[(&str, &str)],
) -> Result<Vec<(&'a str, &'a str)>, String> {
    for (i, (n, _)) in pairs.iter().enumerate() {
        if !dims.names.iter().any(|d| **d == **n) {
            return Err(format!(
                "the meter has no dimension `{n}` (its dimensions: {})",
                dims.names.iter().map(|d| &**d).collect::<Vec<_>>().join(", ")
            ));
        }
        if pairs[..i].iter().any(|(m, _)| m == n) {
            return Err(format!("`{n}` is named twice"));
        }
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (d, name) in dims.names.iter().enumerate() {
        let Some((_, v)) = pairs.iter().find(|(n, _)| **n == **name) else { continue };
        let Some(value) = dims.values[d].iter().find(|x| ***x == **v && ***x != *OPEN_POSITION) else {
            if dims.open_dimension() == Some(d) {
                return Err(format!(
                    "`{v}` is not listed in values.{name}: a limit names listed values (the open dimension's \
                     other values are counted in the meter's total and in selectors over other dimensions)"
                ));
            }
            return Err(format!("`{v}` is not a value of the dimension `{name}`"));
        };
        out.push((&**name, &**value));
    }
    Ok(out)
}
