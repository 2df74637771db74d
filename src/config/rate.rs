//! A rate, `"10/s"`: the value of `rate` and `unknown_key_rate`.

use std::{fmt, num::NonZeroU32, str::FromStr, time::Duration};

/// A request rate written so nobody misreads it: `"100/s"`, `"6000/min"`, `"50000/day"`.
///
/// ```
/// use tollgate::config::Rate;
/// let rate: Rate = "6000/min".parse().unwrap();
/// assert_eq!(rate.count().get(), 6000);
/// assert_eq!(rate.per().as_secs(), 60);
/// assert!("0/s".parse::<Rate>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub(super) count: NonZeroU32,
    pub(super) per: Duration,
}

impl Rate {
    /// Builds a rate of `count` requests per `per`.
    #[must_use]
    pub fn new(count: NonZeroU32, per: Duration) -> Option<Self> {
        (!per.is_zero() && per / count.get() > Duration::ZERO).then_some(Self { count, per })
    }

    /// How many requests the rate admits per [`per`](Self::per).
    #[must_use]
    pub fn count(&self) -> NonZeroU32 {
        self.count
    }

    /// The time unit of the rate.
    #[must_use]
    pub fn per(&self) -> Duration {
        self.per
    }

    /// The interval after which one more request is allowed.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.per / self.count.get()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            86_400 => "day",
            _ => return write!(f, "{}/{}", self.count, humantime::format_duration(self.per)),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Why a rate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateError {
    /// The text is not of the form `COUNT/UNIT` (with no spaces).
    #[error("expected a rate such as \"100/s\" or \"6000/min\", without spaces")]
    Format,
    /// The count is zero or not a whole number (digits, `_` allowed only between two digits).
    #[error("the count of a rate must be a whole number from 1 to 4294967295 (`_` only between digits)")]
    Count,
    /// The unit is not one of `s`, `min`, `h`, `day`.
    #[error("unknown unit of a rate: use s, min, h or day")]
    Unit,
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(char::is_whitespace) {
            return Err(RateError::Format);
        }
        let (count, unit) = s.split_once('/').ok_or(RateError::Format)?;
        // Digits, with single underscores between them as separators (`6_000`).
        let digits = count.split('_');
        if !digits.clone().all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
            return Err(RateError::Count);
        }
        let count: u32 = digits.collect::<String>().parse().map_err(|_| RateError::Count)?;
        let count = NonZeroU32::new(count).ok_or(RateError::Count)?;
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            _ => return Err(RateError::Unit),
        };
        Rate::new(count, per).ok_or(RateError::Count)
    }
}
