//! A quota on one meter ([`QuotaSpec`]) as plans, tenants' overrides and spend caps write it:
//! `quotas.METER = { limit, period, mode, anchor_day, lease }`, and a spend cap's quota on the
//! spend meter (`spend = { limit, period, mode, max_limit }`).

use std::num::NonZeroU64;

use serde::Deserialize;

use super::{validator::Validator, BillingSettings, ConfigError};
use crate::base::{Period, QuotaMode, SpendCap};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuota {
    pub(crate) limit: Option<i64>,
    pub(crate) period: String,
    pub(crate) mode: Option<String>,
    pub(crate) anchor_day: Option<i64>,
    pub(crate) lease: Option<i64>,
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

/// A quota on one meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSpec {
    pub(crate) limit: NonZeroU64,
    pub(crate) period: Period,
    pub(crate) mode: QuotaMode,
    pub(crate) lease: NonZeroU64,
    /// A spend cap's quota: a tenant's own cap, kept by the quota store, holds it in place of
    /// this limit when the tenant set one.
    pub(crate) capped: bool,
    /// A spend cap's quota: the most a tenant's own hard cap holds it to (`spend.max_limit`
    /// in force); 0 otherwise.
    pub(crate) cap_max: u64,
    /// Its unit in headers when it is not its meter's name (a spend cap's: `nano-usd`, or a
    /// coarser one its caps fit in: [`header_scale`](crate::base::header_scale)).
    pub(crate) unit: Option<Box<str>>,
    /// Its units in one unit of its headers (a spend cap's shown in micro-units: 1,000; else 1).
    pub(crate) unit_scale: u64,
    /// A prepaid balance whose plan allows auto-recharge of it (`recharge.METER`): its
    /// refills watch the tenant's recharge in the store.
    pub(crate) recharged: bool,
}

impl QuotaSpec {
    /// Units allowed per period. A prepaid balance ([`Period::Prepaid`]) has no limit of its
    /// own (each tenant's open grants are its limit): this is then
    /// [`MAX_BALANCE`](crate::store::contract::MAX_BALANCE), the most a balance can hold.
    #[must_use]
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The calendar period.
    #[must_use]
    pub fn period(&self) -> Period {
        self.period
    }

    /// Hard (reject) or soft (admit and count overage).
    #[must_use]
    pub fn mode(&self) -> QuotaMode {
        self.mode
    }

    /// How many units a node reserves from the store at once.
    #[must_use]
    pub fn lease(&self) -> NonZeroU64 {
        self.lease
    }

    /// `value` of this quota as its headers show it: in their unit, at most
    /// [`HEADER_INTEGER_MAX`](crate::base::HEADER_INTEGER_MAX).
    #[inline]
    pub(crate) fn in_header(&self, value: u64) -> u64 {
        let value = if self.unit_scale > 1 { value / self.unit_scale } else { value };
        value.min(crate::base::HEADER_INTEGER_MAX)
    }

    /// A spend cap's quota: the tenant's own cap `own` if it is the one in force (a hard one,
    /// or a soft one on a plan whose cap is soft: a soft cap of the tenant's never lifts a
    /// hard one of the plan's), as the store holds it (`store::capped_limit`): a hard one at
    /// most `cap_max`.
    pub(crate) fn own_in_force(&self, own: Option<SpendCap>) -> Option<SpendCap> {
        match own? {
            c if c.hard => Some(SpendCap::new(c.limit.min(self.cap_max), true)),
            c if self.mode == QuotaMode::Soft => Some(c),
            _ => None,
        }
    }

    /// The limit and hardness in force of a spend cap's quota under the tenant's own cap
    /// `own` ([`own_in_force`](Self::own_in_force), else the plan's).
    pub(crate) fn in_force(&self, own: Option<SpendCap>) -> (u64, bool) {
        self.own_in_force(own).map_or((self.limit.get(), self.mode == QuotaMode::Hard), |c| (c.limit, c.hard))
    }
}

/// The quota on the spend meter of a spend cap of `limit` nano-units, which a tenant's own
/// cap may raise up to `max`.
pub(crate) fn spend_quota(limit: u64, max: u64, period: Period, mode: QuotaMode, currency: &str) -> QuotaSpec {
    // A thirty-second of the cap a lease (within a lease's largest), so that a fleet's leases
    // strand little of it.
    let lease = (limit / 32).clamp(1, 1 << 44);
    // Headers show it in a unit its caps fit in (RFC 8941's 15 digits).
    let (unit_scale, prefix) = crate::base::header_scale(limit.max(max));
    QuotaSpec {
        limit: NonZeroU64::new(limit).unwrap_or(NonZeroU64::MIN),
        period,
        mode,
        lease: NonZeroU64::new(lease).unwrap_or(NonZeroU64::MIN),
        capped: true,
        cap_max: max,
        unit: Some(format!("{prefix}-{currency}").into()),
        unit_scale,
        recharged: false,
    }
}

impl Validator<'_, '_> {
    pub(super) fn quota(&self, base: &str, q: &RawQuota) -> Result<QuotaSpec, ConfigError> {
        let period = match q.period.as_str() {
            "minute" => {
                if q.anchor_day.is_some() {
                    return Err(self.invalid(&format!("{base}.anchor_day"), "only monthly quotas have an anchor day"));
                }
                Period::Minute
            }
            "day" => {
                if q.anchor_day.is_some() {
                    return Err(self.invalid(&format!("{base}.anchor_day"), "only monthly quotas have an anchor day"));
                }
                Period::Day
            }
            "month" => {
                let anchor_day = match q.anchor_day {
                    None => 1,
                    Some(d @ 1..=31) => d as u8,
                    Some(d) => {
                        return Err(self.invalid(
                            &format!("{base}.anchor_day"),
                            format!("must be a day of the month from 1 to 31, not {d}"),
                        ))
                    }
                };
                Period::Month { anchor_day }
            }
            "prepaid" => {
                if q.anchor_day.is_some() {
                    return Err(self.invalid(&format!("{base}.anchor_day"), "only monthly quotas have an anchor day"));
                }
                if q.limit.is_some() {
                    return Err(self.invalid(
                        &format!("{base}.limit"),
                        "a prepaid balance has no limit: each tenant's grants are its limit (`tollgate credits grant`)",
                    ));
                }
                if q.mode.as_deref().is_some_and(|m| m != "hard") {
                    return Err(self.invalid(
                        &format!("{base}.mode"),
                        "a prepaid balance is hard: work past it is refused (usage reported after the work may still take it below zero)",
                    ));
                }
                Period::Prepaid
            }
            other => {
                return Err(self.invalid(
                    &format!("{base}.period"),
                    format!("expected \"minute\", \"day\", \"month\" or \"prepaid\", not \"{other}\""),
                ))
            }
        };
        let limit = match (period, q.limit) {
            (Period::Prepaid, _) => NonZeroU64::new(crate::base::MAX_BALANCE).unwrap_or(NonZeroU64::MAX),
            (_, Some(limit)) => self.positive(&format!("{base}.limit"), limit)?,
            (_, None) => {
                return Err(self.invalid(
                    &format!("{base}.limit"),
                    "a minute, day or month quota needs a limit (units per period)",
                ))
            }
        };
        let mode = match q.mode.as_deref().unwrap_or("hard") {
            "hard" => QuotaMode::Hard,
            "soft" => QuotaMode::Soft,
            other => {
                return Err(
                    self.invalid(&format!("{base}.mode"), format!("expected \"hard\" or \"soft\", not \"{other}\""))
                )
            }
        };
        let lease = match q.lease {
            Some(l) => self.positive(&format!("{base}.lease"), l)?,
            // A balance's leases start small (a balance is money, and may be small); they grow
            // with the tenant's pace up to a sixteenth of what it holds.
            None if period == Period::Prepaid => NonZeroU64::new(100).unwrap_or(NonZeroU64::MIN),
            // A sixteenth of the limit, between 1 and 10,000 units.
            None => NonZeroU64::new((limit.get() / 16).clamp(1, 10_000)).unwrap_or(NonZeroU64::MIN),
        };
        Ok(QuotaSpec {
            limit,
            period,
            mode,
            lease,
            capped: false,
            cap_max: 0,
            unit: None,
            unit_scale: 1,
            recharged: false,
        })
    }

    /// A spend cap (`spend = { … }`) at `key`: its quota on the spend meter and its
    /// `max_limit` (what a tenant may raise it to; its limit when not said), in nano-units.
    pub(super) fn spend(
        &self,
        key: &str,
        raw: &RawSpend,
        billing: &BillingSettings,
    ) -> Result<(QuotaSpec, u64), ConfigError> {
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
            "hard" => QuotaMode::Hard,
            "soft" => QuotaMode::Soft,
            other => {
                return Err(
                    self.invalid(&format!("{key}.mode"), format!("expected \"hard\" or \"soft\", not \"{other}\""))
                )
            }
        };
        let currency = billing.currency.as_deref().unwrap_or_default();
        let spec = spend_quota(limit, max, period, mode, currency);
        Ok((spec, max))
    }
}
