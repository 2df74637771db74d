//! `[billing]`, prices and spend caps: money, as exact decimals (never floats), counted in
//! nano-units of the currency.

use rust_decimal::Decimal;
use serde::Deserialize;

use super::validator::Validator;
use super::ConfigError;
use crate::base::Period;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBilling {
    pub(crate) currency: Option<String>,
}

/// A plan's (or a tenant override's) spend cap as written: `spend = { limit = "50.00", period =
/// "month", mode = "hard", max_limit = "500.00" }`.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpend {
    pub(crate) limit: Option<String>,
    pub(crate) period: Option<String>,
    pub(crate) mode: Option<String>,
    pub(crate) max_limit: Option<String>,
    pub(crate) anchor_day: Option<i64>,
}

/// `[billing]`: the currency prices and spend caps are in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BillingSettings {
    /// The ISO 4217 code of the currency, in lower case (`usd`); `None` without `[billing]`
    /// (then no price nor spend cap may be set).
    pub currency: Option<String>,
}

/// Nano-units (10⁻⁹) of the currency in one unit of it: spend is counted in them, so that
/// per-token prices of AI models ($0.15 per million tokens: 150 nano-dollars a token) are
/// exact per request.
pub const NANOS: u64 = 1_000_000_000;

/// The largest spend cap: 1,000,000,000 units of the currency (10¹⁸ nano-units, within the
/// stores' signed 64-bit counters).
pub const MAX_CAP_NANOS: u64 = 1_000_000_000 * NANOS;

/// The name of the meter spend is counted on: reserved (a user meter may not take it).
pub const SPEND_METER: &str = "spend";

/// `amount` (a decimal of the currency) in nano-units, when it is a whole number of them.
#[must_use]
pub fn nanos_of(amount: Decimal) -> Option<u64> {
    let n = amount.checked_mul(Decimal::from(NANOS))?;
    if n.fract() != Decimal::ZERO || n.is_sign_negative() {
        return None;
    }
    u64::try_from(n).ok()
}

/// Nano-units as a decimal of the currency (`1500000000` → `1.5`).
#[must_use]
pub fn amount_of(nanos: u64) -> Decimal {
    (Decimal::from(nanos) / Decimal::from(NANOS)).normalize()
}

/// The nano-units `units` of a meter cost at `price` (a decimal of the currency per unit), not
/// rounded.
#[must_use]
pub fn cost_nanos(units: u64, price: Decimal) -> Decimal {
    Decimal::from(units).saturating_mul(price).saturating_mul(Decimal::from(NANOS))
}

/// Rounds nano-units up to a whole number of them (`⌈x⌉`), saturating.
#[must_use]
pub fn ceil_nanos(nanos: Decimal) -> u64 {
    u64::try_from(nanos.ceil()).unwrap_or(if nanos.is_sign_negative() { 0 } else { u64::MAX })
}

impl Validator<'_, '_> {
    /// `[billing]`.
    pub(super) fn billing(&self, raw: Option<&RawBilling>) -> Result<BillingSettings, ConfigError> {
        let Some(raw) = raw else { return Ok(BillingSettings::default()) };
        let currency = match raw.currency.as_deref() {
            None => return Err(self.invalid("billing.currency", "[billing] needs the currency: currency = \"usd\"")),
            Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_lowercase()) => c.to_owned(),
            Some(c) => {
                return Err(self.invalid(
                    "billing.currency",
                    format!("expected an ISO 4217 code in lower case (\"usd\", \"eur\"), not \"{c}\""),
                ))
            }
        };
        Ok(BillingSettings { currency: Some(currency) })
    }

    /// A price at `key`: a decimal string of the currency per unit, zero or more.
    pub(super) fn price(&self, key: &str, text: &str, billing: &BillingSettings) -> Result<Decimal, ConfigError> {
        if billing.currency.is_none() {
            return Err(self.invalid(key, "a price needs the currency: [billing] currency = \"usd\""));
        }
        let price = Decimal::from_str_exact(text.trim()).map_err(|_| {
            self.invalid(
                key,
                format!("expected a decimal string of the currency per unit (\"0.000002\"), not \"{text}\""),
            )
        })?;
        if price.is_sign_negative() {
            return Err(self.invalid(key, format!("a price may not be negative, not \"{text}\"")));
        }
        Ok(price.normalize())
    }

    /// An amount of money at `key` (a cap): a decimal string, more than zero, a whole number of
    /// nano-units, at most [`MAX_CAP_NANOS`]. In nano-units.
    pub(super) fn money(&self, key: &str, text: &str) -> Result<u64, ConfigError> {
        let bad = || {
            self.invalid(
                key,
                format!(
                    "expected an amount of the currency, more than 0, at most 9 decimals (\"50.00\"), not \"{text}\""
                ),
            )
        };
        let amount = Decimal::from_str_exact(text.trim()).map_err(|_| bad())?;
        let nanos = nanos_of(amount).filter(|n| *n > 0).ok_or_else(bad)?;
        if nanos > MAX_CAP_NANOS {
            return Err(self.invalid(key, "a cap of at most 1,000,000,000 of the currency"));
        }
        Ok(nanos)
    }

    /// A spend cap (`spend = { … }`) at `key`: its quota on the spend meter and its
    /// `max_limit` (what a tenant may raise it to; its limit when not said), in nano-units.
    pub(super) fn spend(
        &self,
        key: &str,
        raw: &RawSpend,
        billing: &BillingSettings,
    ) -> Result<(super::QuotaSpec, u64), ConfigError> {
        if billing.currency.is_none() {
            return Err(self.invalid(key, "a spend cap needs the currency: [billing] currency = \"usd\""));
        }
        let Some(limit) = &raw.limit else {
            return Err(self.invalid(&format!("{key}.limit"), "a spend cap needs a limit (\"50.00\")"));
        };
        let limit = self.money(&format!("{key}.limit"), limit)?;
        let max = match &raw.max_limit {
            None => limit,
            Some(m) => self.money(&format!("{key}.max_limit"), m)?,
        };
        if max < limit {
            return Err(self.invalid(&format!("{key}.max_limit"), "must be at least the spend cap's limit"));
        }
        let period = match (raw.period.as_deref().unwrap_or("month"), raw.anchor_day) {
            ("day", None) => Period::Day,
            ("month", None) => Period::Month { anchor_day: 1 },
            ("month", Some(d @ 1..=31)) => Period::Month { anchor_day: d as u8 },
            ("month", Some(d)) => {
                return Err(
                    self.invalid(&format!("{key}.anchor_day"), format!("a day of the month from 1 to 31, not {d}"))
                )
            }
            ("day", Some(_)) => {
                return Err(self.invalid(&format!("{key}.anchor_day"), "only a monthly spend cap has an anchor day"))
            }
            (other, _) => {
                return Err(
                    self.invalid(&format!("{key}.period"), format!("expected \"day\" or \"month\", not \"{other}\""))
                )
            }
        };
        let mode = match raw.mode.as_deref().unwrap_or("hard") {
            "hard" => crate::base::QuotaMode::Hard,
            "soft" => crate::base::QuotaMode::Soft,
            other => {
                return Err(
                    self.invalid(&format!("{key}.mode"), format!("expected \"hard\" or \"soft\", not \"{other}\""))
                )
            }
        };
        let currency = billing.currency.as_deref().unwrap_or_default();
        let spec = super::plans::spend_quota(limit, max, period, mode, currency);
        Ok((spec, max))
    }
}

/// `text` as a decimal amount, for callers outside the configuration (`Admin`, the routes).
///
/// # Errors
/// Not a decimal, negative, zero, more than 9 decimals or past [`MAX_CAP_NANOS`].
pub fn parse_cap(text: &str) -> Result<u64, String> {
    let amount = Decimal::from_str_exact(text.trim()).map_err(|_| format!("\"{text}\" is not a decimal amount"))?;
    match nanos_of(amount) {
        Some(n) if n > 0 && n <= MAX_CAP_NANOS => Ok(n),
        _ => Err(format!("\"{text}\": an amount more than 0, at most 9 decimals, at most 1,000,000,000")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_counted_exactly_in_nano_units() {
        let per_million = Decimal::from_str_exact("0.00000015").unwrap();
        assert_eq!(cost_nanos(7, per_million), Decimal::from(1_050));
        assert_eq!(ceil_nanos(cost_nanos(7, per_million)), 1_050);
        assert_eq!(ceil_nanos(cost_nanos(1, Decimal::from_str_exact("0.0000000015").unwrap())), 2, "rounded up");
        assert_eq!(nanos_of(Decimal::from_str_exact("50.00").unwrap()), Some(50 * NANOS));
        assert_eq!(nanos_of(Decimal::from_str_exact("0.0000000001").unwrap()), None, "finer than a nano-unit");
        assert_eq!(amount_of(1_500_000_000).to_string(), "1.5");
        assert_eq!(parse_cap("25.00"), Ok(25 * NANOS));
        assert!(parse_cap("-1").is_err() && parse_cap("0").is_err() && parse_cap("abc").is_err());
        assert!(parse_cap("1000000000.01").is_err());
        assert!(parse_cap("25.0000000000000000000000000001").is_err(), "not rounded to 25");
    }
}
