//! `[usage]`: usage windows, what is billable, and what a store failure does.

use std::{fmt, time::Duration};

use serde::Deserialize;

use super::ConfigError;
use super::{validator::Validator, StoreErrorPolicy};

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUsage {
    pub(crate) flush_interval: Option<String>,
    pub(crate) window: Option<String>,
    pub(crate) grace: Option<String>,
    pub(crate) billable: Option<Vec<String>>,
    pub(crate) bill_cancelled: Option<bool>,
    pub(crate) billable_grpc: Option<Vec<String>>,
    pub(crate) on_store_error: Option<String>,
    pub(crate) store_timeout: Option<String>,
    pub(crate) queue_timeout: Option<String>,
    pub(crate) view_refresh_rate: Option<String>,
    pub(crate) default_meter: Option<String>,
    pub(crate) shutdown_timeout: Option<String>,
    pub(crate) max_buffered_records: Option<u64>,
    pub(crate) notify_at: Option<Vec<i64>>,
    pub(crate) notify_left: Option<Vec<i64>>,
}

/// The longest `usage.grace`: Stripe accepts meter events up to 35 days old.
pub(super) const MAX_GRACE: Duration = Duration::from_secs(35 * 86_400);

/// The gRPC status codes by name, in code order (0 to 16).
pub(super) const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code written as its name (any case) or its number.
pub(super) fn grpc_code(text: &str) -> Option<u8> {
    let text = text.trim();
    match text.parse::<u8>() {
        Ok(n) if n <= 16 => Some(n),
        Ok(_) => None,
        Err(_) => GRPC_CODES.iter().position(|n| n.eq_ignore_ascii_case(text)).map(|n| n as u8),
    }
}

/// The HTTP status a gRPC status code stands for (the mapping of google.rpc.Code).
pub(super) fn grpc_http_equivalent(code: u8) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// The set of response statuses whose requests are billed.
///
/// By default every status but 5xx: a failed request gives its units back.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet {
    pub(super) bits: [u64; 10],
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

/// How usage is aggregated, flushed and billed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UsageSettings {
    /// How often the worker writes aggregated usage to the store.
    pub flush_interval: Duration,
    /// The length of an aggregation window (one billing meter event per tenant, meter, window).
    pub window: Duration,
    /// How long after its end a window is exported (late usage still lands in it).
    pub grace: Duration,
    /// Which statuses are billed; the others give their units back.
    pub billable: StatusSet,
    /// Whether a request cut off (the client gone) once the service had it is billed as a
    /// completed one (true by default); a request cut off before always gives its units back.
    pub bill_cancelled: bool,
    /// The gRPC status codes billed, a bit per code (0 to 16): by default those whose HTTP
    /// equivalent `billable` bills (`OK` and the client errors; not `INTERNAL`, `UNAVAILABLE`
    /// and the other server-side failures).
    pub(crate) billable_grpc: u32,
    /// The default policy when the store cannot be reached.
    pub on_store_error: StoreErrorPolicy,
    /// Whether the file set `on_store_error`. Unset, each quota follows its mode: a hard
    /// quota fails closed (it is never passed), a soft one fails open.
    pub(crate) on_store_error_set: bool,
    /// How long a request may wait on the store before `on_store_error` applies.
    pub store_timeout: Duration,
    /// How long a request waits its turn behind its tenant's other requests' store calls on
    /// this node (a quota cell's lock) before it is refused
    /// [`TenantBusy`](crate::RejectionKind::TenantBusy): time queued in the node, which is not
    /// the store's (`store_timeout` bounds each call once its turn has come).
    pub queue_timeout: Duration,
    /// How many tenants' usage views ([`Tollgate::tenant_usage`](crate::Tollgate::tenant_usage))
    /// this node makes anew, at most (up to the count at once, then at that rate), whoever
    /// polls: past it a poll is answered the view kept if it is at most a minute old, else
    /// 503 with `Retry-After: 1`.
    pub view_refresh_rate: super::Rate,
    /// How long `shutdown()` keeps retrying the final flush and export while the store is down.
    pub shutdown_timeout: Duration,
    /// The most usage records (tenant × meter × window) held in memory while the store does
    /// not take them. When full, `on_store_error` decides: fail-closed tenants are refused
    /// (503) until the store takes the usage; fail-open usage past the bound is dropped,
    /// counted and logged.
    pub max_buffered_records: usize,
    /// The quota thresholds, in percent of the limit, at which the
    /// [`on_threshold`](crate::Builder::on_threshold) hook is called (80 and 100 by default).
    pub notify_at: Vec<u16>,
    /// Thresholds in units left (`[1000]`: when 1,000 units or fewer are left), at which the
    /// [`on_threshold`](crate::Builder::on_threshold) hook is called too (none by default):
    /// for prepaid balances, whose limit moves with each grant, most of all.
    pub notify_left: Vec<u64>,
}

impl Validator<'_, '_> {
    /// `[usage]` (but `default_meter`, read with the meters).
    pub(super) fn usage(&self, u: &RawUsage) -> Result<UsageSettings, ConfigError> {
        let mut billable = StatusSet::empty();
        match &u.billable {
            None => billable = StatusSet::default(),
            Some(list) if list.is_empty() => {
                return Err(self.invalid(
                    "usage.billable",
                    "must list at least one status or range: with none, no request would ever be billed",
                ))
            }
            Some(list) => {
                for (i, item) in list.iter().enumerate() {
                    let path = format!("usage.billable[{i}]");
                    let (from, to) = item.split_once('-').unwrap_or((item, item));
                    let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|c| (100..600).contains(c));
                    match (parse(from), parse(to)) {
                        (Some(a), Some(b)) if a <= b => billable.insert_range(a, b),
                        _ => {
                            return Err(
                                self.invalid(&path, "expected a status such as \"200\" or a range such as \"200-499\"")
                            )
                        }
                    }
                }
            }
        }
        let billable_grpc = match &u.billable_grpc {
            None => (0..=16u8).filter(|&c| billable.contains(grpc_http_equivalent(c))).fold(0, |b, c| b | 1 << c),
            Some(codes) => {
                let mut bits = 0u32;
                for (i, code) in codes.iter().enumerate() {
                    let c = grpc_code(code).ok_or_else(|| {
                        self.invalid(
                            &format!("usage.billable_grpc[{i}]"),
                            format!(
                                "`{code}` is not a gRPC status code (a name such as \"INVALID_ARGUMENT\", or 0 to 16)"
                            ),
                        )
                    })?;
                    bits |= 1 << c;
                }
                bits
            }
        };
        let mut usage = UsageSettings {
            flush_interval: self.duration(
                "usage.flush_interval",
                u.flush_interval.as_deref(),
                Duration::from_secs(10),
            )?,
            window: self.duration("usage.window", u.window.as_deref(), Duration::from_secs(3600))?,
            grace: self.duration("usage.grace", u.grace.as_deref(), Duration::from_secs(300))?,
            billable,
            bill_cancelled: u.bill_cancelled.unwrap_or(true),
            billable_grpc,
            on_store_error_set: u.on_store_error.is_some(),
            on_store_error: match &u.on_store_error {
                Some(v) => self.policy("usage.on_store_error", v)?,
                None => StoreErrorPolicy::FailOpen,
            },
            store_timeout: self.duration(
                "usage.store_timeout",
                u.store_timeout.as_deref(),
                Duration::from_millis(250),
            )?,
            queue_timeout: self.duration("usage.queue_timeout", u.queue_timeout.as_deref(), Duration::from_secs(2))?,
            view_refresh_rate: match &u.view_refresh_rate {
                None => "50/s".parse().expect("a valid rate"),
                Some(r) => {
                    r.parse().map_err(|e| self.invalid("usage.view_refresh_rate", format!("{e}, not \"{r}\"")))?
                }
            },
            shutdown_timeout: self.duration(
                "usage.shutdown_timeout",
                u.shutdown_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            max_buffered_records: match u.max_buffered_records {
                None => 1 << 20,
                Some(0) => return Err(self.invalid("usage.max_buffered_records", "must be at least 1")),
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            },
            notify_at: match &u.notify_at {
                None => vec![80, 100],
                Some(list) => {
                    let mut out: Vec<u16> = Vec::with_capacity(list.len());
                    for (i, p) in list.iter().enumerate() {
                        let at = format!("usage.notify_at[{i}]");
                        let p = u16::try_from(*p)
                            .ok()
                            .filter(|p| (1..=1000).contains(p))
                            .ok_or_else(|| self.invalid(&at, format!("a percentage from 1 to 1000, not {p}")))?;
                        if out.contains(&p) {
                            return Err(self.invalid(&at, format!("{p} is listed twice")));
                        }
                        out.push(p);
                    }
                    if out.len() > 32 {
                        return Err(self.invalid("usage.notify_at", "at most 32 thresholds"));
                    }
                    out.sort_unstable();
                    out
                }
            },
            notify_left: {
                let mut out: Vec<u64> = Vec::new();
                for (i, n) in u.notify_left.iter().flatten().enumerate() {
                    let at = format!("usage.notify_left[{i}]");
                    let n = u64::try_from(*n).map_err(|_| self.invalid(&at, format!("a number of units, not {n}")))?;
                    if out.contains(&n) {
                        return Err(self.invalid(&at, format!("{n} is listed twice")));
                    }
                    out.push(n);
                }
                if out.len() > 32 {
                    return Err(self.invalid("usage.notify_left", "at most 32 thresholds"));
                }
                out.sort_unstable();
                out
            },
        };
        if u.queue_timeout.is_none() {
            // Unset: 2 s, or one call's whole time if a store's timeout is longer.
            usage.queue_timeout = usage.queue_timeout.max(usage.store_timeout);
        } else if usage.queue_timeout < usage.store_timeout
            || usage.queue_timeout > usage.store_timeout.max(Duration::from_secs(60))
        {
            return Err(self.invalid(
                "usage.queue_timeout",
                format!(
                    "must be at least usage.store_timeout ({:?}, a turn waits for at least one call) and at most 60s (or store_timeout, if longer)",
                    usage.store_timeout
                ),
            ));
        }
        if usage.window.as_secs() == 0 || usage.window.subsec_nanos() != 0 || 86_400 % usage.window.as_secs() != 0 {
            return Err(self.invalid(
                "usage.window",
                "must be a whole number of seconds that divides a day (such as \"1m\", \"15m\", \"1h\")",
            ));
        }
        if usage.grace > MAX_GRACE {
            return Err(self.invalid(
                "usage.grace",
                "must be at most 35 days: billing (Stripe) rejects meter events older than that",
            ));
        }
        if usage.flush_interval >= usage.window {
            return Err(self.invalid("usage.flush_interval", "must be shorter than usage.window"));
        }
        Ok(usage)
    }
}
