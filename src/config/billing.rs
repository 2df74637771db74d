//! `[billing]`, prices and spend caps: money, as exact decimals (never floats), counted in
//! nano-units of the currency.

use rust_decimal::Decimal;
use serde::Deserialize;

use super::validator::Validator;
use super::ConfigError;
use crate::base::{nanos_of, MAX_CAP_NANOS};

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBilling {
    pub(crate) currency: Option<String>,
}

/// `[billing]`: the currency prices and spend caps are in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BillingSettings {
    /// The ISO 4217 code of the currency, in lower case (`usd`); `None` without `[billing]`
    /// (then no price nor spend cap may be set).
    pub currency: Option<String>,
}

/// The ISO 4217 codes of the currencies in circulation (the list SIX, the maintenance agency,
/// keeps, as of 2025: `xcg` beside `ang`, which it replaces, during their transition; `zwg`; `sll`
/// beside `sle`, as Stripe still takes it), in lower case and sorted. Codes withdrawn (`cuc`,
/// `zwl`) and codes that are not money to
/// price in (precious metals, bond units, `xdr`, funds codes such as `usn` or `clf`, `xts`,
/// `xxx`) are left out.
const ISO_4217: &[&str] = &[
    "aed", "afn", "all", "amd", "ang", "aoa", "ars", "aud", "awg", "azn", "bam", "bbd", "bdt", "bgn", "bhd", "bif",
    "bmd", "bnd", "bob", "brl", "bsd", "btn", "bwp", "byn", "bzd", "cad", "cdf", "chf", "clp", "cny", "cop", "crc",
    "cup", "cve", "czk", "djf", "dkk", "dop", "dzd", "egp", "ern", "etb", "eur", "fjd", "fkp", "gbp", "gel", "ghs",
    "gip", "gmd", "gnf", "gtq", "gyd", "hkd", "hnl", "htg", "huf", "idr", "ils", "inr", "iqd", "irr", "isk", "jmd",
    "jod", "jpy", "kes", "kgs", "khr", "kmf", "kpw", "krw", "kwd", "kyd", "kzt", "lak", "lbp", "lkr", "lrd", "lsl",
    "lyd", "mad", "mdl", "mga", "mkd", "mmk", "mnt", "mop", "mru", "mur", "mvr", "mwk", "mxn", "myr", "mzn", "nad",
    "ngn", "nio", "nok", "npr", "nzd", "omr", "pab", "pen", "pgk", "php", "pkr", "pln", "pyg", "qar", "ron", "rsd",
    "rub", "rwf", "sar", "sbd", "scr", "sdg", "sek", "sgd", "shp", "sle", "sll", "sos", "srd", "ssp", "stn", "svc",
    "syp", "szl", "thb", "tjs", "tmt", "tnd", "top", "try", "ttd", "twd", "tzs", "uah", "ugx", "usd", "uyu", "uzs",
    "ved", "ves", "vnd", "vuv", "wst", "xaf", "xcd", "xcg", "xof", "xpf", "yer", "zar", "zmw", "zwg",
];

impl Validator<'_, '_> {
    /// `[billing]`.
    pub(super) fn billing(&self, raw: Option<&RawBilling>) -> Result<BillingSettings, ConfigError> {
        let Some(raw) = raw else { return Ok(BillingSettings::default()) };
        let currency = match raw.currency.as_deref() {
            None => return Err(self.invalid("billing.currency", "[billing] needs the currency: currency = \"usd\"")),
            Some(c) if ISO_4217.binary_search(&c).is_ok() => c.to_owned(),
            Some(c) => {
                return Err(self.invalid(
                    "billing.currency",
                    format!("expected an ISO 4217 currency code in lower case (\"usd\", \"eur\"), not \"{c}\""),
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
}
