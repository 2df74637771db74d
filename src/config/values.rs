//! Typed configuration values: identifiers, rates, periods, policies.

use std::{fmt, num::NonZeroU32, str::FromStr, time::Duration};

use crate::base::PlanId;

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
    count: NonZeroU32,
    per: Duration,
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

/// What a request gets when the store cannot be reached within its time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorPolicy {
    /// Admit the request (its usage is still recorded) and count the error.
    FailOpen,
    /// Reject the request with 503 and count the error.
    FailClosed,
}

/// Where the engine keeps its counters, usage and tenant directory: the `[store]` section.
///
/// Without a `[store]` section, [`Builder::open`](crate::Builder::open) opens the embedded
/// durable default: SQLite in `tollgate.db` in the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreSettings {
    /// `kind = "memory"`: everything in the process's memory, lost when it stops.
    Memory,
    /// `kind = "sqlite"`: one SQLite file (cargo feature `sqlite`, on by default).
    Sqlite {
        /// The database file (`path`, default `tollgate.db`, relative to the working directory).
        path: std::path::PathBuf,
        /// When a committed write reaches the disk (`synchronous`, default `"full"`).
        synchronous: Synchronous,
    },
    /// `kind = "dynamodb"`: one DynamoDB table shared by a fleet (cargo feature `dynamodb`).
    Dynamodb {
        /// The table's name (`table`).
        table: String,
        /// An endpoint other than AWS's (`endpoint`), such as a local DynamoDB-compatible server.
        endpoint: Option<String>,
    },
    /// `kind = "postgres"`: one schema of a PostgreSQL database shared by a fleet (cargo
    /// feature `postgres`).
    Postgres(PostgresSettings),
}

/// The keys of `[store] kind = "postgres"`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresSettings {
    /// The connection URL (`url`); without it, the `DATABASE_URL` environment variable is read
    /// when the store opens. Never shown: it may hold a password.
    pub url: Option<String>,
    /// The schema holding tollgate's tables (`schema`, default `tollgate`).
    pub schema: String,
    /// The most connections of the pool (`pool_size`, default 16).
    pub pool_size: usize,
    /// How long one statement of a transaction may run (`SET LOCAL`; a call that is one
    /// statement is bounded by the engine's time limit), and how long a call waits for a
    /// connection (`statement_timeout`, default 5 s, at most 24 days).
    pub statement_timeout: std::time::Duration,
    /// Apply migrations at open, or only verify the schema (`migrate`, default `"auto"`).
    pub migrate: Migrate,
    /// Certificate authorities to trust besides the public ones (`ca_file`, a PEM file).
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("migrate", &self.migrate)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: None,
            schema: "tollgate".to_owned(),
            pool_size: 16,
            statement_timeout: std::time::Duration::from_secs(5),
            migrate: Migrate::Auto,
            ca_file: None,
        }
    }
}

/// Whether a store applies its schema's migrations when it opens, or only checks that the
/// schema is the one it needs (`[store] migrate`, PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Migrate {
    /// Creates the schema and applies missing migrations at open, under an advisory lock (the
    /// role owns the schema).
    #[default]
    Auto,
    /// Checks the version only, and refuses a schema that is missing or older: for a role of
    /// least privilege, with `tollgate migrate` run by the schema's owner.
    Verify,
}

impl StoreSettings {
    /// The kind as written in the file (`memory`, `sqlite`, `dynamodb`).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            StoreSettings::Memory => "memory",
            StoreSettings::Sqlite { .. } => "sqlite",
            StoreSettings::Dynamodb { .. } => "dynamodb",
            StoreSettings::Postgres(_) => "postgres",
        }
    }

    /// Whether the nodes of a fleet share this store (DynamoDB, PostgreSQL), rather than each
    /// node having its own (memory, a SQLite file).
    #[must_use]
    pub fn is_shared(&self) -> bool {
        match self {
            StoreSettings::Memory | StoreSettings::Sqlite { .. } => false,
            StoreSettings::Dynamodb { .. } | StoreSettings::Postgres(_) => true,
        }
    }

    /// The cargo feature the kind needs, if any.
    #[must_use]
    pub fn feature(&self) -> Option<&'static str> {
        match self {
            StoreSettings::Memory => None,
            StoreSettings::Sqlite { .. } => Some("sqlite"),
            StoreSettings::Dynamodb { .. } => Some("dynamodb"),
            StoreSettings::Postgres(_) => Some("postgres"),
        }
    }
}

impl std::fmt::Display for StoreSettings {
    /// `memory`, `sqlite at <path> (synchronous = full)`, `dynamodb table <table>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSettings::Memory => f.write_str("memory"),
            StoreSettings::Sqlite { path, synchronous } => {
                let sync = match synchronous {
                    Synchronous::Full => "full",
                    Synchronous::Normal => "normal",
                };
                write!(f, "sqlite at {} (synchronous = {sync})", path.display())
            }
            StoreSettings::Dynamodb { table, endpoint: None } => write!(f, "dynamodb table {table}"),
            StoreSettings::Dynamodb { table, endpoint: Some(e) } => write!(f, "dynamodb table {table} at {e}"),
            // The URL is never shown (it may hold a password).
            StoreSettings::Postgres(p) => write!(f, "postgres schema {}", p.schema),
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings::Sqlite { path: "tollgate.db".into(), synchronous: Synchronous::Full }
    }
}

/// SQLite's `synchronous` setting for the store's file (in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// `FULL`: every committed store call is on disk before it returns, through a power cut or
    /// an operating-system crash too. The default: store calls are off the request path and
    /// batched, so an fsync each is cheap.
    #[default]
    Full,
    /// `NORMAL`: a process crash (SIGKILL included) loses nothing committed; a power cut or an
    /// operating-system crash may lose the calls since the last checkpoint.
    Normal,
}

/// Which rate-limit headers responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` as IETF httpapi ratelimit-headers draft-10 says
    /// (draft-11 where its text differs): `t` of the rate is the seconds until the next cell,
    /// `qu` takes only registered units (a meter of another unit says it in the vendor
    /// parameter `tollgate-unit`), and 429s of the rate, a quota or concurrency use the
    /// draft's `quota-exceeded` problem type with `violated-policies`.
    Draft,
    /// `"draft-compat"`: the draft forms of earlier tollgate versions, for clients that depend
    /// on them: `t` of the rate until the bucket is full, `qu` naming any meter, and
    /// tollgate's own problem types on every 429.
    DraftCompat,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    Legacy,
    /// No rate-limit headers (`Retry-After` is still sent on 429).
    None,
}

/// How the tenant of a request is identified.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Identify {
    /// An API key in a request header, looked up in the tenant directory.
    ApiKey {
        /// The header carrying the key (`x-api-key` by default).
        header: http::HeaderName,
    },
    /// A [`Identity`](crate::Identity) that an authentication layer put in the request
    /// extensions.
    Extension,
}

/// What a request gets when its tenant is missing or unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnUnknown {
    /// 401 with an `application/problem+json` body.
    Reject,
    /// Served under this plan, all such requests sharing one anonymous tenant.
    Anonymous(PlanId),
}

/// The set of response statuses whose requests are billed.
///
/// By default every status but 5xx: a failed request gives its units back.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet {
    bits: [u64; 10],
}

impl StatusSet {
    /// The empty set.
    #[must_use]
    pub fn empty() -> Self {
        Self { bits: [0; 10] }
    }

    /// Adds the statuses from `from` to `to`, both included (100 to 599).
    pub fn insert_range(&mut self, from: u16, to: u16) {
        for code in from.max(100)..=to.min(599) {
            let i = usize::from(code - 100);
            self.bits[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether the set holds `status`.
    #[inline]
    #[must_use]
    pub fn contains(&self, status: u16) -> bool {
        if !(100..600).contains(&status) {
            return false;
        }
        let i = usize::from(status - 100);
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }
}

impl Default for StatusSet {
    fn default() -> Self {
        let mut set = Self::empty();
        set.insert_range(100, 499);
        set
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut code = 100u16;
        while code < 600 {
            if self.contains(code) {
                let start = code;
                while code + 1 < 600 && self.contains(code + 1) {
                    code += 1;
                }
                list.entry(&format_args!("{start}-{code}"));
            }
            code += 1;
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::{InvalidTenantId, Period, TenantId};
    use chrono::{TimeZone, Utc};

    fn ts(y: i32, m: u32, d: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap().timestamp()
    }

    #[test]
    fn rates_parse() {
        assert_eq!("100/s".parse::<Rate>().unwrap().interval(), Duration::from_millis(10));
        assert_eq!("6_000/min".parse::<Rate>().unwrap().count().get(), 6000);
        assert_eq!("1/day".parse::<Rate>().unwrap().per(), Duration::from_secs(86_400));
        assert_eq!("0/s".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("10/week".parse::<Rate>(), Err(RateError::Unit));
        assert_eq!("10".parse::<Rate>(), Err(RateError::Format));
        assert_eq!("-3/s".parse::<Rate>(), Err(RateError::Count));
        // Underscores only between digits, and no spaces anywhere.
        assert_eq!("1_000_000/day".parse::<Rate>().unwrap().count().get(), 1_000_000);
        assert_eq!("_2/s".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("2_/s".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("6__000/min".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("2 / s".parse::<Rate>(), Err(RateError::Format));
        assert_eq!(" 2/s".parse::<Rate>(), Err(RateError::Format));
        assert_eq!("2/s\n".parse::<Rate>(), Err(RateError::Format));
    }

    #[test]
    fn tenant_ids() {
        assert_eq!(TenantId::parse("sub|1234").unwrap().as_str(), "sub|1234");
        assert!(TenantId::is_valid("!~") && TenantId::is_valid(&"a".repeat(128)));
        assert_eq!(TenantId::parse(""), Err(InvalidTenantId::Empty));
        assert_eq!(TenantId::parse(&"a".repeat(129)), Err(InvalidTenantId::TooLong { len: 129 }));
        assert_eq!(TenantId::parse("a b"), Err(InvalidTenantId::Character { at: 1, found: ' ' }));
        assert_eq!(TenantId::parse("ab\t"), Err(InvalidTenantId::Character { at: 2, found: '\t' }));
        assert_eq!(TenantId::parse("café"), Err(InvalidTenantId::Character { at: 3, found: 'é' }));
        assert!(!TenantId::is_valid("a\u{7f}"));
        assert!(TenantId::parse("a b").unwrap_err().to_string().contains("128 visible ASCII"));
    }

    #[test]
    fn month_periods_follow_the_calendar() {
        let m = Period::Month { anchor_day: 1 };
        assert_eq!(m.bounds(ts(2026, 2, 14) + 5), (ts(2026, 2, 1), ts(2026, 3, 1)));
        assert_eq!(m.bounds(ts(2026, 12, 31)), (ts(2026, 12, 1), ts(2027, 1, 1)));
        let anchored = Period::Month { anchor_day: 31 };
        // February has no 31st: the period starts on its last day.
        assert_eq!(anchored.bounds(ts(2026, 3, 1)), (ts(2026, 2, 28), ts(2026, 3, 31)));
        assert_eq!(anchored.bounds(ts(2026, 1, 30)), (ts(2025, 12, 31), ts(2026, 1, 31)));
        let d = Period::Day;
        assert_eq!(d.bounds(ts(2024, 2, 29) + 86_399), (ts(2024, 2, 29), ts(2024, 3, 1)));
    }

    #[test]
    fn status_sets() {
        let s = StatusSet::default();
        assert!(s.contains(200) && s.contains(404) && !s.contains(500) && !s.contains(99));
        assert_eq!(format!("{s:?}"), "[100-499]");
    }
}
