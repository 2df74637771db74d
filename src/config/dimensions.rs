//! A meter's dimensions (`[meters.<name>] dimensions`, `values`, `on_unknown`, `prices`): the
//! series a dimensioned meter counts in, the selectors plans limit, and the price of each series.
//!
//! A meter with dimensions is compiled into ordinary meters, so that every store, lease, hold,
//! export and report keeps working on meters alone:
//!
//! - the meter itself (`tokens`): the total of its series, limited by `quotas.tokens`, never
//!   priced, and recording no usage of its own (its series are the usage; its windows pending
//!   from before it had dimensions export as they were);
//! - a **series** per combination of values (`tokens{model=m-large,kind=output}`, the values in
//!   the order the dimensions are declared): priced, exported with its values as the billing
//!   event's dimensions;
//! - a **selector** per partial combination a plan or a tenant's overrides limit
//!   (`tokens{model=m-large}`): counted against its quota, never priced, recording no usage.
//!
//! A record of a series counts in the series, in its meter and in every selector it matches.

use std::collections::BTreeMap;

use super::{validator::Validator, ConfigError};

/// The most dimensions a meter may have.
pub const MAX_DIMENSIONS: usize = 4;
pub(crate) use crate::base::is_dimension_value;
pub use crate::base::{MAX_DIMENSION_LEN, MAX_OPEN_VALUES};
/// The value a record's unknown or missing value counts under with `on_unknown = "other"`; in
/// an open dimension, the value of units past the tenant's `max_values`.
pub const OTHER_VALUE: &str = "other";
/// The position of an open dimension's values not listed (`tokens{model=*,kind=output}`): the
/// series they are limited and priced as, each counted and billed under its own value. Out of
/// the values' grammar, so it never names a value.
pub(crate) const OPEN_POSITION: &str = "*";

/// What a record with a value a closed list lacks, or without a dimension, does
/// (`[meters.<name>] on_unknown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnUnknownValue {
    /// Refused: the record is an error ([`RecordError::Dimension`](crate::RecordError)),
    /// nothing counted. The default.
    #[default]
    Refuse,
    /// Counted under the value `"other"` of that dimension, a series of its own.
    Other,
}

/// The dimensions of a meter: their names in the declared order, each one's closed list of
/// values, and what an unknown value does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterDimensions {
    pub(crate) names: Box<[Box<str>]>,
    /// Each dimension's values, as declared; with `on_unknown = "other"`, `"other"` last.
    /// An open dimension's list ends with [`OPEN_POSITION`].
    pub(crate) values: Box<[Box<[Box<str>]>]>,
    pub(crate) on_unknown: OnUnknownValue,
    /// The open dimension (`max_values`), if any: its index and the most values a tenant may
    /// use in a month.
    pub(crate) open: Option<(usize, u32)>,
}

impl MeterDimensions {
    /// The dimensions' names, in the declared order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }

    /// The values a dimension lists (with `on_unknown = "other"`, `"other"` among them); of an
    /// open dimension, those listed alone.
    #[must_use]
    pub fn values(&self, dimension: &str) -> Option<impl Iterator<Item = &str>> {
        let d = self.names.iter().position(|n| **n == *dimension)?;
        Some(self.values[d].iter().map(|v| &**v).filter(|v| *v != OPEN_POSITION))
    }

    /// The open dimension (`max_values`) and the most values a tenant may use in a month.
    #[must_use]
    pub fn open(&self) -> Option<(&str, u32)> {
        self.open.map(|(d, max)| (&*self.names[d], max))
    }

    /// The index of the open dimension, if any.
    pub(crate) fn open_dimension(&self) -> Option<usize> {
        self.open.map(|(d, _)| d)
    }

    /// What an unknown or missing value does.
    #[must_use]
    pub fn on_unknown(&self) -> OnUnknownValue {
        self.on_unknown
    }

    /// How many series the meter counts in (the product of its lists).
    #[must_use]
    pub fn series(&self) -> usize {
        self.values.iter().try_fold(1usize, |n, v| n.checked_mul(v.len())).unwrap_or(usize::MAX)
    }

    /// The position of `value` in dimension `d`'s list, or of `"other"` for a value the list
    /// lacks (or none given) under `on_unknown = "other"`.
    ///
    /// In the open dimension, a value listed is at its place, and any other value in the
    /// grammar at [`OPEN_POSITION`] (the last); a value out of the grammar, or none, there too
    /// under `on_unknown = "other"` (counted under `"other"`: see [`open_value`](Self::open_value)).
    pub(crate) fn position(&self, d: usize, value: Option<&str>) -> Result<usize, DimensionError> {
        let list = &self.values[d];
        if let Some(v) = value {
            if let Some(i) = list.iter().position(|x| **x == *v && **x != *OPEN_POSITION) {
                return Ok(i);
            }
            if self.open_dimension() == Some(d) && is_dimension_value(v) {
                return Ok(list.len() - 1);
            }
        }
        match self.on_unknown {
            OnUnknownValue::Other => Ok(list.len() - 1),
            OnUnknownValue::Refuse => Err(match value {
                None => DimensionError::Missing(self.names[d].to_string()),
                Some(v) => DimensionError::UnknownValue { dimension: self.names[d].to_string(), value: truncated(v) },
            }),
        }
    }

    /// The value a record of the open dimension counts under, given its `value` (which
    /// [`position`](Self::position) placed at [`OPEN_POSITION`]): itself, or `"other"` for a
    /// missing value or one out of the grammar.
    pub(crate) fn open_value(value: Option<&str>) -> &str {
        match value {
            Some(v) if is_dimension_value(v) => v,
            _ => OTHER_VALUE,
        }
    }

    /// The offset of a series among its meter's series, from each dimension's position
    /// (the first dimension varies slowest).
    #[cfg(test)]
    pub(crate) fn offset(&self, positions: impl Iterator<Item = usize>) -> usize {
        positions.zip(self.values.iter()).fold(0, |acc, (p, list)| acc * list.len() + p)
    }

    /// The values of the series at `offset`, in the declared order.
    pub(crate) fn values_at(&self, mut offset: usize) -> Vec<(&str, &str)> {
        let mut out = Vec::with_capacity(self.names.len());
        for (d, list) in self.values.iter().enumerate().rev() {
            out.push((&*self.names[d], &*list[offset % list.len()]));
            offset /= list.len();
        }
        out.reverse();
        out
    }
}

/// Why a record's dimension values name no series of its meter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DimensionError {
    /// The record gave no value for a dimension of the meter (and `on_unknown = "refuse"`).
    #[error("no value for the dimension `{0}`")]
    Missing(String),
    /// The value is not in the dimension's list (and `on_unknown = "refuse"`).
    #[error("`{value}` is not a value of the dimension `{dimension}`")]
    UnknownValue {
        /// The dimension.
        dimension: String,
        /// The value, cut to 64 bytes.
        value: String,
    },
    /// The meter has no such dimension.
    #[error("the meter has no dimension `{0}`")]
    UnknownDimension(String),
    /// The value is new to the tenant this month, which used its open dimension's
    /// `max_values` already (and `on_unknown = "refuse"`).
    #[error(
        "`{value}` would be a new value of the dimension `{dimension}`: this month's {max} values (max_values) \
         are used"
    )]
    TooManyValues {
        /// The dimension.
        dimension: String,
        /// The value, cut to 64 bytes.
        value: String,
        /// Its `max_values`.
        max: u32,
    },
    /// The meter has no dimensions, or a value was given twice.
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn truncated(v: &str) -> String {
    let mut end = v.len().min(MAX_DIMENSION_LEN);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v[..end].to_owned()
}

/// Whether `name` is a dimension's name: 1 to 64 bytes of lowercase letters, digits and `_`,
/// starting with a letter (a Stripe payload key, a Prometheus label).
pub(crate) fn is_dimension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DIMENSION_LEN
        && name.as_bytes()[0].is_ascii_lowercase()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The id of the series or selector of `meter` with these values (already in declared order):
/// `tokens{model=m-large,kind=output}`; `meter` itself with none.
pub(crate) fn selector_id<'a>(meter: &str, values: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::from(meter);
    let mut first = true;
    for (n, v) in values {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(n);
        out.push('=');
        out.push_str(v);
    }
    if !first {
        out.push('}');
    }
    out
}

/// A selector's meter and its (dimension, value) pairs, as written.
pub(crate) type Selector<'a> = (&'a str, Vec<(&'a str, &'a str)>);

/// A selector as written, `tokens{model=m-large, kind="output"}` (Prometheus' label syntax,
/// `=` only): the meter and its (name, value) pairs as written. `None` for a text without
/// braces (a plain meter's name).
pub(crate) fn parse_selector(text: &str) -> Option<Result<Selector<'_>, String>> {
    let (meter, rest) = text.split_once('{')?;
    let Some(inner) = rest.strip_suffix('}') else {
        return Some(Err("a selector ends with `}`: `tokens{model=m-large}`".into()));
    };
    let mut pairs = Vec::new();
    for part in inner.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((n, v)) = part.split_once('=') else {
            return Some(Err(format!("`{part}` is not `dimension=value`")));
        };
        let (n, v) = (n.trim(), v.trim());
        if n.ends_with('!') || v.starts_with('~') || v.starts_with('=') {
            return Some(Err("a selector matches values with `=` only".into()));
        }
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        pairs.push((n, v));
    }
    if pairs.is_empty() {
        return Some(Err("a selector names at least one dimension: `tokens{model=m-large}`".into()));
    }
    Some(Ok((meter.trim(), pairs)))
}

/// The values in a series' or a selector's id (`tokens{model=m-large,kind=output}`), in their
/// order; none for another meter's.
pub(crate) fn series_values(meter: &crate::base::MeterId) -> Vec<(String, String)> {
    match parse_selector(meter.as_str()) {
        Some(Ok((_, pairs))) => pairs.into_iter().map(|(n, v)| (n.to_owned(), v.to_owned())).collect(),
        _ => Vec::new(),
    }
}

/// A key path segment, quoted when it is not a bare TOML key.
pub(crate) fn key_segment(key: &str) -> String {
    if key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')) {
        key.to_owned()
    } else {
        format!("\"{key}\"")
    }
}

impl Validator<'_, '_> {
    /// `[meters.<name>]`'s dimensions, values and on_unknown, at `path`.
    pub(super) fn dimensions(
        &self,
        path: &str,
        names: &[String],
        values: &BTreeMap<String, Vec<String>>,
        max_values: &BTreeMap<String, u32>,
        on_unknown: Option<&str>,
    ) -> Result<MeterDimensions, ConfigError> {
        if names.is_empty() || names.len() > MAX_DIMENSIONS {
            return Err(self.invalid(
                &format!("{path}.dimensions"),
                format!("a meter has 1 to {MAX_DIMENSIONS} dimensions (leave the key out for none)"),
            ));
        }
        for (i, n) in names.iter().enumerate() {
            if !is_dimension_name(n) {
                return Err(self.invalid(
                    &format!("{path}.dimensions"),
                    format!(
                        "`{n}` is not a dimension name: 1 to 64 lowercase letters, digits and '_', starting with a \
                         letter"
                    ),
                ));
            }
            // The keys a billing event carries already (Stripe's payload, Metronome's properties).
            if matches!(
                &**n,
                "value" | "stripe_customer_id" | "tenant" | "meter" | "window_start" | "window_end" | "revision"
            ) {
                return Err(self.invalid(
                    &format!("{path}.dimensions"),
                    format!("`{n}` is a key billing events carry already: name the dimension otherwise"),
                ));
            }
            if names[..i].contains(n) {
                return Err(self.invalid(&format!("{path}.dimensions"), format!("`{n}` is named twice")));
            }
        }
        let on_unknown = match on_unknown {
            None | Some("refuse") => OnUnknownValue::Refuse,
            Some("other") => OnUnknownValue::Other,
            Some(other) => {
                return Err(self.invalid(
                    &format!("{path}.on_unknown"),
                    format!("`{other}` is not a policy: expected \"refuse\" (the default) or \"other\""),
                ))
            }
        };
        if let Some(n) = values.keys().find(|k| !names.contains(k)) {
            return Err(self.invalid(
                &format!("{path}.values.{}", key_segment(n)),
                format!("`{n}` is not among the meter's dimensions"),
            ));
        }
        let mut open = None;
        for (n, &max) in max_values {
            let key = format!("{path}.max_values.{}", key_segment(n));
            let Some(d) = names.iter().position(|x| x == n) else {
                return Err(self.invalid(&key, format!("`{n}` is not among the meter's dimensions")));
            };
            if open.is_some() {
                return Err(self.invalid(&key, "one dimension of a meter may be open (max_values)"));
            }
            if max == 0 || max > MAX_OPEN_VALUES {
                return Err(
                    self.invalid(&key, format!("the values a tenant may use in a month: 1 to {MAX_OPEN_VALUES}"))
                );
            }
            open = Some((d, max));
        }
        let mut lists = Vec::with_capacity(names.len());
        for (d, n) in names.iter().enumerate() {
            let key = format!("{path}.values.{n}");
            let is_open = open.is_some_and(|(o, _)| o == d);
            let none = Vec::new();
            let list = match values.get(n) {
                Some(list) => list,
                None if is_open => &none,
                None => {
                    return Err(self.invalid(
                        &format!("{path}.values"),
                        format!(
                            "the dimension `{n}` needs its list of values: values.{n} = [\"…\"] (or, open, \
                             max_values.{n} = 50)"
                        ),
                    ))
                }
            };
            if is_open {
                if list.iter().any(|v| v == OTHER_VALUE) {
                    return Err(self.invalid(
                        &key,
                        "`other` is where an open dimension counts values past max_values: name the value otherwise",
                    ));
                }
                let mut out: Vec<Box<str>> = Vec::with_capacity(list.len() + 1);
                for (i, v) in list.iter().enumerate() {
                    self.check_listed(&key, v, &list[..i])?;
                    out.push(Box::from(v.as_str()));
                }
                out.push(OPEN_POSITION.into());
                lists.push(out.into_boxed_slice());
                continue;
            }
            if list.is_empty() {
                return Err(self.invalid(&key, "a list of values is not empty"));
            }
            for (i, v) in list.iter().enumerate() {
                self.check_listed(&key, v, &list[..i])?;
                if v == OTHER_VALUE && on_unknown == OnUnknownValue::Other {
                    return Err(self.invalid(&key, "`other` is the value of unknown values already (on_unknown)"));
                }
            }
            let mut out: Vec<Box<str>> = list.iter().map(|v| Box::from(v.as_str())).collect();
            if on_unknown == OnUnknownValue::Other {
                out.push(OTHER_VALUE.into());
            }
            lists.push(out.into_boxed_slice());
        }
        Ok(MeterDimensions {
            names: names.iter().map(|n| Box::from(n.as_str())).collect(),
            values: lists.into(),
            on_unknown,
            open,
        })
    }

    /// A value of a dimension's list, at `key`: in the grammar, not `default`, listed once.
    fn check_listed(&self, key: &str, v: &str, before: &[String]) -> Result<(), ConfigError> {
        if !is_dimension_value(v) {
            return Err(
                self.invalid(key, format!("`{v}` is not a dimension value: 1 to 64 letters, digits, '-', '_' and '.'"))
            );
        }
        if v == "default" {
            return Err(self.invalid(key, "`default` names a price for every value: name the value otherwise"));
        }
        if before.iter().any(|b| b == v) {
            return Err(self.invalid(key, format!("`{v}` is listed twice")));
        }
        Ok(())
    }

    /// The price of the series with `values` in the tree `prices` (nested in the dimensions'
    /// order, `default` at any level, a string covering every value below it): the most
    /// specific, a value's key before `default` at each level, falling back to an outer
    /// `default` where an inner level names neither.
    pub(super) fn series_price(
        &self,
        path: &str,
        prices: &toml::Value,
        values: &[(&str, &str)],
        billing: &super::BillingSettings,
    ) -> Result<Option<rust_decimal::Decimal>, ConfigError> {
        self.price_at(&format!("{path}.prices"), prices, values, billing)
    }

    fn price_at(
        &self,
        at: &str,
        node: &toml::Value,
        values: &[(&str, &str)],
        billing: &super::BillingSettings,
    ) -> Result<Option<rust_decimal::Decimal>, ConfigError> {
        match (node, values.split_first()) {
            (toml::Value::String(text), _) => Ok(Some(self.price(at, text, billing)?)),
            (toml::Value::Table(t), Some(((_, v), rest))) => {
                for key in [*v, "default"] {
                    if let Some(next) = t.get(key) {
                        if let Some(p) = self.price_at(&format!("{at}.{}", key_segment(key)), next, rest, billing)? {
                            return Ok(Some(p));
                        }
                    }
                }
                Ok(None)
            }
            (toml::Value::Table(_), None) => {
                Err(self.invalid(at, "expected a price (\"0.000002\") for the values above it"))
            }
            _ => Err(self.invalid(at, "expected a price (\"0.000002\") or a table of prices")),
        }
    }

    /// Every key of the price tree names a value of its level's dimension, or `default`.
    pub(super) fn check_price_keys(
        &self,
        path: &str,
        dims: &MeterDimensions,
        node: &toml::Value,
        level: usize,
    ) -> Result<(), ConfigError> {
        let t = match node {
            toml::Value::String(_) => return Ok(()),
            toml::Value::Table(t) => t,
            _ => return Err(self.invalid(path, "expected a price (\"0.000002\") or a table of prices")),
        };
        let Some(list) = dims.values.get(level) else {
            return Err(self.invalid(path, "nested deeper than the meter's dimensions"));
        };
        for (k, v) in t {
            let key = format!("{path}.{}", key_segment(k));
            if k != "default" && (k == OPEN_POSITION || !list.iter().any(|x| **x == **k)) {
                return Err(self.invalid(
                    &key,
                    format!("`{k}` is not a value of the dimension `{}` (nor `default`)", dims.names[level]),
                ));
            }
            self.check_price_keys(&key, dims, v, level + 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METER: &str = "[billing]\ncurrency = \"usd\"\n[meters.tokens]\ndimensions = [\"model\", \"kind\"]\n\
        values.model = [\"m-small\", \"m-large\"]\nvalues.kind = [\"input\", \"output\"]\n";

    fn err(text: &str) -> ConfigError {
        super::super::document::parse(text).unwrap_err()
    }

    /// Selectors naming a dimension or a value the meter lacks, prices naming a value it lacks
    /// or leaving a series without a price, and values out of their grammar are refused by
    /// key, line and name.
    #[test]
    fn bad_dimensions_selectors_and_prices_are_refused_by_name() {
        let plan = |q: &str| {
            format!("{METER}[plans.p]\nquotas.\"{q}\" = {{ limit = 10, period = \"day\", mode = \"soft\" }}\n")
        };
        let e = err(&plan("tokens{region=eu}"));
        assert!(e.to_string().contains("no dimension `region`"), "{e}");
        assert_eq!(e.line(), Some(8), "{e}");
        let e = err(&plan("tokens{model=m-huge}"));
        assert!(e.to_string().contains("`m-huge` is not a value of the dimension `model`"), "{e}");
        let e = err(&plan("requests{model=m-large}"));
        assert!(e.to_string().contains("has no dimensions"), "{e}");
        assert!(super::super::document::parse(&plan("tokens{ kind=output, model=m-large }")).is_ok());
        let e = err(&format!("{METER}[meters.tokens.prices.m-huge]\ninput = \"1\"\n"));
        assert_eq!(e.key(), "meters.tokens.prices.m-huge", "{e}");
        let e = err(&format!("{METER}[meters.tokens.prices.m-small]\ninput = \"1\"\n"));
        assert!(e.to_string().contains("no price for model=m-small, kind=output"), "{e}");
        let ok = format!(
            "{METER}[meters.tokens.prices]\ndefault = \"0.5\"\n[meters.tokens.prices.m-large]\noutput = \"2\"\n"
        );
        let c = super::super::document::parse(&ok).unwrap();
        let price = |id: &str| c.meters().iter().find(|m| m.id().as_str() == id).unwrap().price();
        assert_eq!(price("tokens{model=m-small,kind=output}").unwrap().to_string(), "0.5");
        assert_eq!(price("tokens{model=m-large,kind=output}").unwrap().to_string(), "2");
        assert_eq!(price("tokens{model=m-large,kind=input}").unwrap().to_string(), "0.5");
        assert_eq!(price("tokens"), None, "the total is never priced");
        let e = err(&METER.replace("\"m-large\"]", "\"m large\"]"));
        assert!(e.to_string().contains("is not a dimension value"), "{e}");
        let e = err(&METER.replace("\"kind\"]", "\"value\"]"));
        assert!(e.to_string().contains("carry already"), "{e}");
        let e = err(&format!("{METER}price = \"1\"\n"));
        assert_eq!(e.key(), "meters.tokens.price");
        let e = err(&format!("{METER}[[routes]]\npath = \"/x\"\nmeter = \"tokens\"\n"));
        assert!(e.to_string().contains("has dimensions"), "{e}");
        // Two spellings of one selector in one plan.
        let two = format!(
            "{METER}[plans.p]\nquotas.\"tokens{{model=m-large}}\" = {{ limit = 10, period = \"day\", mode = \"soft\" }}\n\
             quotas.\"tokens{{ model=m-large }}\" = {{ limit = 20, period = \"day\", mode = \"soft\" }}\n"
        );
        assert!(err(&two).to_string().contains("as another key of these quotas does"));
        // A meter whose name in headers is a selector's.
        let e = err(&format!(
            "{METER}[meters.tokens-m-large]\n[plans.p]\nquotas.\"tokens{{model=m-large}}\" = {{ limit = 10, period = \"day\", mode = \"soft\" }}\n"
        ));
        assert!(e.to_string().contains("would both be named `tokens-m-large`"), "{e}");
        // A route's hold_values.
        let route = |values: &str| {
            format!(
                "{METER}[plans.p]\nquotas.tokens = {{ limit = 10, period = \"day\" }}\n[[routes]]\npath = \"/x\"\n\
                 reports = [\"tokens\"]\nhold.tokens = 5\n{values}"
            )
        };
        assert!(super::super::document::parse(&route(
            "hold_values = { model = { header = \"x-model\" }, kind = \"input\" }\n"
        ))
        .is_ok());
        let e = err(&route("hold_values = { model = { header = \"x-model\" } }\n"));
        assert!(e.to_string().contains("needs a value of `kind`"), "{e}");
        let e = err(&route("hold_values = { model = \"m-huge\", kind = \"input\" }\n"));
        assert!(e.to_string().contains("`m-huge` is not a value of the dimension `model`"), "{e}");
        let e = err(&route("hold_values = { region = \"eu\", model = \"m-large\", kind = \"input\" }\n"));
        assert_eq!(e.key(), "routes[0].hold_values.region", "{e}");
        let e = err(&route(""));
        assert!(e.to_string().contains("needs a value of `model`"), "{e}");
        // A header's table takes `header` alone: a `default` is refused, not ignored.
        assert!(super::super::document::parse(&route(
            "hold_values = { model = { header = \"x-model\", default = \"m-small\" }, kind = \"input\" }\n"
        ))
        .is_err());
        // A price that is neither a string nor a table, where no series reaches it.
        let e = err(&format!("{METER}[meters.tokens.prices]\ndefault = 5\nm-small = \"1\"\nm-large = \"1\"\n"));
        assert!(e.to_string().contains("expected a price"), "{e}");
    }

    /// An open dimension (`max_values`): its cap bounded, one per meter, its values not
    /// listed never named by a limit, a price key or a route's written value; a price for
    /// them (`default`) needed when the meter has prices.
    #[test]
    fn open_dimensions_are_checked_by_key() {
        const OPEN: &str = "[billing]\ncurrency = \"usd\"\n[meters.tokens]\ndimensions = [\"model\", \"kind\"]\n\
            values.model = [\"m-large\"]\nmax_values.model = 50\nvalues.kind = [\"input\", \"output\"]\n";
        let ok = super::super::document::parse(OPEN).unwrap();
        let tokens = ok.meters().iter().find(|m| m.id().as_str() == "tokens").unwrap();
        let dims = tokens.dimensions().unwrap();
        assert_eq!(dims.open(), Some(("model", 50)));
        assert_eq!(dims.values("model").unwrap().collect::<Vec<_>>(), ["m-large"], "the listed values");
        assert!(ok.meters().iter().any(|m| m.id().as_str() == "tokens{model=*,kind=output}"), "the open series");
        // Without a list at all.
        assert!(super::super::document::parse(&OPEN.replace("values.model = [\"m-large\"]\n", "")).is_ok());
        let e = err(&OPEN.replace("max_values.model = 50", "max_values.model = 0"));
        assert_eq!(e.key(), "meters.tokens.max_values.model", "{e}");
        assert!(e.to_string().contains("1 to 1000"), "{e}");
        let e = err(&OPEN.replace("max_values.model = 50", "max_values.model = 1001"));
        assert!(e.to_string().contains("1 to 1000"), "{e}");
        let e = err(&OPEN.replace("max_values.model = 50", "max_values.region = 5"));
        assert_eq!(e.key(), "meters.tokens.max_values.region", "{e}");
        let e = err(&OPEN.replace("max_values.model = 50", "max_values = { model = 50, kind = 3 }"));
        assert!(e.to_string().contains("one dimension of a meter may be open"), "{e}");
        let e = err(&OPEN.replace("\"m-large\"]", "\"m-large\", \"other\"]"));
        assert!(e.to_string().contains("past max_values"), "{e}");
        let e = err("[meters.tokens]\nmax_values.model = 5\n");
        assert_eq!(e.key(), "meters.tokens.max_values", "{e}");
        let quota = |q: &str| {
            format!("{OPEN}[plans.p]\nquotas.\"{q}\" = {{ limit = 10, period = \"day\", mode = \"soft\" }}\n")
        };
        assert!(super::super::document::parse(&quota("tokens{model=m-large}")).is_ok());
        assert!(super::super::document::parse(&quota("tokens{kind=output}")).is_ok(), "over a closed dimension");
        let e = err(&quota("tokens{model=*}"));
        assert!(e.to_string().contains("not listed in values.model"), "{e}");
        let e = err(&quota("tokens{model=m-new}"));
        assert!(e.to_string().contains("not listed in values.model"), "{e}");
        // Prices: the values not listed need a price; `*` is no key of the tree.
        let e = err(&format!("{OPEN}[meters.tokens.prices.m-large]\ndefault = \"1\"\n"));
        assert!(e.to_string().contains("model=* (the values not listed)"), "{e}");
        assert!(super::super::document::parse(&format!(
            "{OPEN}[meters.tokens.prices]\ndefault = \"0.5\"\n[meters.tokens.prices.m-large]\ndefault = \"1\"\n"
        ))
        .is_ok());
        let e = err(&format!("{OPEN}[meters.tokens.prices]\n\"*\" = \"1\"\ndefault = \"1\"\n"));
        assert_eq!(e.key(), "meters.tokens.prices.\"*\"", "{e}");
        // A route's written value names a listed one; a header may carry any.
        let route = |values: &str| {
            format!(
                "{OPEN}[plans.p]\nquotas.tokens = {{ limit = 10, period = \"day\" }}\n[[routes]]\npath = \"/x\"\n\
                 reports = [\"tokens\"]\nhold.tokens = 5\nhold_values = {values}\n"
            )
        };
        assert!(super::super::document::parse(&route("{ model = { header = \"x-model\" }, kind = \"input\" }")).is_ok());
        let e = err(&route("{ model = \"*\", kind = \"input\" }"));
        assert_eq!(e.key(), "routes[0].hold_values.model", "{e}");
    }

    #[test]
    fn a_selector_reads_as_prometheus_writes_it() {
        assert_eq!(parse_selector("tokens"), None);
        assert_eq!(
            parse_selector("tokens{model=\"m-large\", kind=output}").unwrap().unwrap(),
            ("tokens", vec![("model", "m-large"), ("kind", "output")])
        );
        assert!(parse_selector("tokens{model!=m}").unwrap().is_err());
        assert!(parse_selector("tokens{model=~m}").unwrap().is_err());
        assert!(parse_selector("tokens{}").unwrap().is_err());
        assert!(parse_selector("tokens{model=m").unwrap().is_err());
    }

    #[test]
    fn a_series_offset_and_its_values_agree() {
        let d = MeterDimensions {
            names: ["model".into(), "kind".into()].into(),
            values: [["a".into(), "b".into()].into(), ["in".into(), "out".into(), "other".into()].into()].into(),
            on_unknown: OnUnknownValue::Other,
            open: None,
        };
        assert_eq!(d.series(), 6);
        for off in 0..6 {
            let vals = d.values_at(off);
            let pos: Vec<usize> = vals.iter().enumerate().map(|(i, (_, v))| d.position(i, Some(v)).unwrap()).collect();
            assert_eq!(d.offset(pos.into_iter()), off);
        }
        assert_eq!(d.position(1, Some("cached")), Ok(2));
        assert_eq!(d.position(1, None), Ok(2));
        assert_eq!(selector_id("tokens", d.values_at(5)), "tokens{model=b,kind=other}");
    }
}
