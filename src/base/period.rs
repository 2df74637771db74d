//! Quota periods (calendar-aligned UTC) and what a quota does once spent.

/// The calendar period of a quota, aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Period {
    /// From the start of a UTC minute to the next: a rate of units per minute (tokens per
    /// minute) kept as a quota the fleet shares. Only on quotas of units (not on a spend cap
    /// or a prepaid balance); its thresholds send no alerts (they would every minute).
    Minute,
    /// From midnight UTC to the next midnight UTC.
    Day,
    /// From a day of the month at midnight UTC (the billing anchor, 1 by default) to the same
    /// day of the next month. An anchor past the end of a short month falls on its last day.
    Month {
        /// The day of the month the period starts on, 1 to 31.
        anchor_day: u8,
    },
    /// No calendar: the tenant's prepaid credits. The limit is the sum of its open grants
    /// ([`CreditGrant`](crate::store::CreditGrant)), held by the quota store beside the units
    /// used; the period never ends.
    Prepaid,
}

impl Period {
    /// The name used in policies and headers (`minute`, `day`, `month`).
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Day => "day",
            Period::Month { .. } => "month",
            Period::Prepaid => "prepaid",
        }
    }

    /// The nominal length of the period in seconds (a month counts 30 days); the length of one
    /// period is that of its [`bounds`](Self::bounds).
    #[must_use]
    pub fn nominal_secs(&self) -> u64 {
        match self {
            Period::Minute => 60,
            Period::Day => 86_400,
            Period::Month { .. } => 30 * 86_400,
            // Never reset: as long as a year, for what needs a length.
            Period::Prepaid => 365 * 86_400,
        }
    }

    /// The period containing `unix_secs`, as `[start, end)` in Unix seconds.
    #[must_use]
    pub fn bounds(&self, unix_secs: i64) -> (i64, i64) {
        use chrono::{Datelike, NaiveDate, TimeZone, Utc};
        match *self {
            Period::Prepaid => (PREPAID_START, PREPAID_END),
            Period::Minute => {
                let start = unix_secs.div_euclid(60) * 60;
                (start, start + 60)
            }
            Period::Day => {
                let start = unix_secs.div_euclid(86_400) * 86_400;
                (start, start + 86_400)
            }
            Period::Month { anchor_day } => {
                let at = Utc.timestamp_opt(unix_secs, 0).single().unwrap_or_default().date_naive();
                let anchor_in = |y: i32, m: u32| -> NaiveDate {
                    let last = last_day_of_month(y, m);
                    NaiveDate::from_ymd_opt(y, m, u32::from(anchor_day).min(last)).expect("a valid day of the month")
                };
                let prev = |y: i32, m: u32| if m == 1 { (y - 1, 12) } else { (y, m - 1) };
                let next = |y: i32, m: u32| if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let (y, m) = (at.year(), at.month());
                let this = anchor_in(y, m);
                let (start, end) = if at >= this {
                    let (ny, nm) = next(y, m);
                    (this, anchor_in(ny, nm))
                } else {
                    let (py, pm) = prev(y, m);
                    (anchor_in(py, pm), this)
                };
                let secs = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp();
                (secs(start), secs(end))
            }
        }
    }
}

/// How long after another period of a meter has started a store keeps a counter's period that
/// ended (the store's contract says it: `store::contract::ENDED_PERIODS_KEPT_SECS`); here, so
/// that the configuration can hold a minute quota's clock skew within it.
pub(crate) const ENDED_PERIODS_KEPT_SECS: i64 = 600;

/// The end of the one prepaid "period" (it never ends in practice): the last whole hour the
/// engine's packed periods hold (22 bits of hours since the epoch, in the year 2448).
pub(crate) const PREPAID_END: i64 = ((1 << 22) - 1) * 3600;
/// The start of the prepaid "period": as long before its end as a packed period can be
/// (1,023 hours), so that the bounds the engine packs and unpacks are these.
pub(crate) const PREPAID_START: i64 = PREPAID_END - 1023 * 3600;

fn last_day_of_month(year: i32, month: u32) -> u32 {
    use chrono::NaiveDate;
    let (ny, nm) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    NaiveDate::from_ymd_opt(ny, nm, 1).and_then(|d| d.pred_opt()).map(|d| chrono::Datelike::day(&d)).unwrap_or(28)
}

/// What a quota does once the tenant's limit is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaMode {
    /// Reject further requests with 429 until the period ends (a prepaid balance: 402 until a
    /// grant tops it up).
    Hard,
    /// Admit further requests and count them as overage.
    Soft,
}
