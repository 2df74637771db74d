//! `[limits]`: the bounds of a node's memory and its response headers.

use std::time::Duration;

use serde::Deserialize;

use super::validator::Validator;
use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub(crate) max_tenants: Option<u64>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) headers: Option<String>,
    pub(crate) idempotency_window: Option<String>,
    pub(crate) idempotency_max_in_flight: Option<String>,
    pub(crate) idempotency_capacity: Option<u64>,
    pub(crate) idempotency_keys_max: Option<u64>,
    pub(crate) idempotency_methods: Option<Vec<String>>,
    pub(crate) idempotency_max_body: Option<u64>,
    pub(crate) idempotency_max_request_body: Option<u64>,
    pub(crate) idempotency_buffer_bytes: Option<u64>,
    pub(crate) idempotency_store_bytes: Option<u64>,
    pub(crate) directory_ttl: Option<String>,
    pub(crate) negative_ttl: Option<String>,
    pub(crate) negative_capacity: Option<u64>,
    pub(crate) shadow: Option<bool>,
    pub(crate) max_clients: Option<u64>,
    pub(crate) balance_status: Option<i64>,
    pub(crate) background_timeout: Option<String>,
    pub(crate) hold_timeout: Option<String>,
    pub(crate) max_holds: Option<u64>,
    pub(crate) max_holds_per_tenant: Option<u64>,
    pub(crate) fleet_size_hint: Option<u64>,
    pub(crate) place_ttl: Option<String>,
    pub(crate) reservation_expiry: Option<String>,
}

/// The longest a hold may stay open (`hold_timeout`): a day, so that it sees at most one roll
/// of a day's or month's period (its units go back to the period they came from). A minute's
/// rolls under a hold many times: what it gives back past the minute after its own is dropped
/// (that minute is over: nothing there to admit).
pub(crate) const MAX_HOLD_TIMEOUT: Duration = Duration::from_secs(86_400);

/// What the headers of a stored response are allowed beside its body, when the store's bound
/// is checked against `limits.idempotency_max_body`.
pub(super) const HEADERS_ALLOWANCE: u64 = 8 * 1024;

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

/// Bounds on the engine's memory and the response headers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// The most tenants whose state is kept; idle tenants beyond it are evicted.
    pub max_tenants: usize,
    /// A tenant not seen for this long is evicted (its usage flushed, its lease returned).
    pub idle_timeout: Duration,
    /// Which rate-limit headers responses carry.
    pub headers: HeaderStyle,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_window: Duration,
    /// How long a request may hold its `Idempotency-Key` in flight in all: its claim is renewed
    /// while it runs, up to this; past it the key is released (and counted).
    pub idempotency_max_in_flight: Duration,
    /// The most `Idempotency-Key`s remembered at once.
    pub idempotency_capacity: u64,
    /// The most `Idempotency-Key` bindings the store holds for the whole fleet
    /// (`idempotency_keys_max`, 2^24 by default): past it a new key is not bound, its request
    /// is served without it and counted (`outcome="keys_full"`); a live binding is never
    /// deleted to make room. SQLite and the memory store hold at most 2^20 whatever this says;
    /// DynamoDB expires bindings by TTL and has no count.
    pub idempotency_keys_max: u64,
    /// The methods whose `Idempotency-Key` is honoured (`POST` and `PATCH` by default: the
    /// others are idempotent by definition, and their key is not even read).
    pub idempotency_methods: Vec<http::Method>,
    /// The longest response body stored for replays of an `Idempotency-Key` (64 KiB by
    /// default; at most 350,000 bytes on a DynamoDB idempotency store). A longer response is
    /// not stored: its key is released, and a retry runs again and is billed.
    pub idempotency_max_body: u64,
    /// The most request body bytes read to fingerprint an `Idempotency-Key`'s request (1 MiB
    /// by default): a body the handler left unread is drained up to it; past it, the key is
    /// bound without the body, and replays are not compared with it.
    pub idempotency_max_request_body: u64,
    /// The most response bytes this node holds at once while responses stream to be stored
    /// (64 MiB by default): a response that would go past it is not stored (its key is
    /// released), counted.
    pub idempotency_buffer_bytes: u64,
    /// The most bytes of stored responses the idempotency store holds at once (1 GiB by
    /// default): a response that would go past it is not stored (its key is released),
    /// counted.
    pub idempotency_store_bytes: u64,
    /// How long a node trusts its cached tenant directory entry: removed keys and plan changes
    /// made in the store reach running nodes within this time.
    pub directory_ttl: Duration,
    /// How long an unknown credential is remembered as unknown (so repeated unknown keys do
    /// not each cost a store lookup).
    pub negative_ttl: Duration,
    /// The most unknown credentials remembered at once (least recently used go first).
    pub negative_capacity: u64,
    /// The whole configuration in shadow mode: every decision is computed, counted and
    /// logged, but nothing is refused (unidentified requests pass too).
    pub shadow: bool,
    /// The most client addresses whose rate state is held for anonymous callers (least
    /// recently used go first).
    pub max_clients: u64,
    /// The status of a request refused because a prepaid balance is empty: `402 Payment
    /// Required` by default ([`RejectionKind::CreditsExhausted`](crate::response::RejectionKind::CreditsExhausted)),
    /// or `429` ([`RejectionKind::QuotaExceeded`](crate::response::RejectionKind::QuotaExceeded)).
    /// Neither carries `Retry-After`: a balance comes back with a payment, not with time.
    pub balance_status: u16,
    /// The longest one store call of background work may take (10 s by default): the flush,
    /// the export and reconciliation passes, webhooks, [`Admin`](crate::admin::Admin), the
    /// settlement of `Idempotency-Key` claims and the worker's passes. They never fail fast;
    /// the request path's calls are bounded by `usage.store_timeout` instead.
    pub background_timeout: Duration,
    /// The longest a request's hold ([`TenantContext::hold`](crate::TenantContext::hold), or
    /// a route's `hold`) stays open (15 minutes by default; a route may set its own): past it,
    /// it is settled as recorded so far (its other units given back) and counted
    /// ([`Stats::holds_expired`](crate::report::Stats::holds_expired)); a record through it after
    /// that is charged as debt.
    pub hold_timeout: Duration,
    /// The most holds open at once on a node, requests' holds and jobs' reservations together
    /// (10,000 by default): a request's hold past it is refused, 429 `Units held` with
    /// `Retry-After: 1`, a reservation with `EventError::HoldsFull`; both counted
    /// (`tollgate_holds_total{outcome="refused_full"}`).
    pub max_holds: usize,
    /// The most of those one tenant has open at once on a node (1,000 by default, at most
    /// `max_holds`): one tenant's long streams never get every other tenant's holds refused.
    /// Past it, the tenant's hold is refused as at `max_holds`.
    pub max_holds_per_tenant: usize,
    /// How many nodes share a fleet rate (1 by default): when the rate role's store fails and
    /// a fleet rate fails open, each node falls back to a bucket of its own at rate / N and
    /// burst / N (never below the largest route cost).
    pub fleet_size_hint: u32,
    /// Whether the file sets `fleet_size_hint` (a fleet scope failing open needs it).
    pub(crate) fleet_size_hint_set: bool,
    /// How long a node's places of a fleet concurrency hold without a renewal (30 s by
    /// default): a node that dies frees them then. A node renews them every third of it, and
    /// stops admitting on places it could not renew within two thirds of it.
    pub place_ttl: Duration,
    /// How long a node's reservation of a quota counter (its lease's unused units and its
    /// requests' holds) lasts without a call renewing it (30 minutes by default, at least twice
    /// `idle_timeout`): a node renews it with every call and every flush that finds it
    /// changed or half gone. Past it, the store gives those units back (a node that died: a
    /// SIGKILL, a host lost, a Lambda environment reaped); jobs' reservations stay spent.
    /// A node stops spending its lease at the expiry less [`Limits::clock_skew`], so the
    /// clocks of a node and of the fleet's other nodes may differ by that much.
    pub reservation_expiry: Duration,
}

impl Limits {
    /// The clock skew between nodes that [`reservation_expiry`](Self::reservation_expiry)
    /// tolerates: a tenth of it (3 minutes by default). A node stops spending a lease whose
    /// reservation was last renewed `reservation_expiry − clock_skew` ago.
    #[must_use]
    pub fn clock_skew(&self) -> Duration {
        self.reservation_expiry / 10
    }
}

impl Validator<'_, '_> {
    /// `[limits]`.
    pub(super) fn limits(&self, l: &RawLimits) -> Result<Limits, ConfigError> {
        Ok(Limits {
            max_tenants: match l.max_tenants {
                None => 100_000,
                Some(0) => return Err(self.invalid("limits.max_tenants", "must be at least 1")),
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            },
            idle_timeout: self.duration(
                "limits.idle_timeout",
                l.idle_timeout.as_deref(),
                Duration::from_secs(15 * 60),
            )?,
            headers: match l.headers.as_deref().unwrap_or("draft") {
                "draft" => HeaderStyle::Draft,
                "draft-compat" => HeaderStyle::DraftCompat,
                "legacy" => HeaderStyle::Legacy,
                "none" => HeaderStyle::None,
                _ => {
                    return Err(
                        self.invalid("limits.headers", "expected \"draft\", \"draft-compat\", \"legacy\" or \"none\"")
                    )
                }
            },
            idempotency_window: self.duration(
                "limits.idempotency_window",
                l.idempotency_window.as_deref(),
                Duration::from_secs(24 * 3600),
            )?,
            idempotency_max_in_flight: {
                let d = self.duration(
                    "limits.idempotency_max_in_flight",
                    l.idempotency_max_in_flight.as_deref(),
                    Duration::from_secs(15 * 60),
                )?;
                if d > Duration::from_secs(24 * 3600) {
                    return Err(self.invalid("limits.idempotency_max_in_flight", "must be at most 24 hours"));
                }
                d
            },
            idempotency_keys_max: match l.idempotency_keys_max {
                None => 1 << 24,
                Some(0) => return Err(self.invalid("limits.idempotency_keys_max", "must be at least 1")),
                Some(n) => n,
            },
            idempotency_capacity: match l.idempotency_capacity {
                None => 100_000,
                Some(0) => return Err(self.invalid("limits.idempotency_capacity", "must be at least 1")),
                Some(n) => n,
            },
            idempotency_methods: match &l.idempotency_methods {
                None => vec![http::Method::POST, http::Method::PATCH],
                Some(list) => {
                    let mut methods = Vec::with_capacity(list.len());
                    for (i, m) in list.iter().enumerate() {
                        let path = format!("limits.idempotency_methods[{i}]");
                        let method = self.method(&path, m)?;
                        if methods.contains(&method) {
                            return Err(self.invalid(&path, format!("`{method}` is listed twice")));
                        }
                        methods.push(method);
                    }
                    methods
                }
            },
            idempotency_max_body: l.idempotency_max_body.unwrap_or(64 * 1024),
            idempotency_max_request_body: l.idempotency_max_request_body.unwrap_or(1 << 20),
            idempotency_buffer_bytes: match l.idempotency_buffer_bytes {
                None => 64 << 20,
                Some(0) => {
                    return Err(self.invalid(
                        "limits.idempotency_buffer_bytes",
                        "must be at least 1 (0 would store no response: every key released, every retry billed)",
                    ))
                }
                Some(n) => n,
            },
            idempotency_store_bytes: match l.idempotency_store_bytes {
                None => 1 << 30,
                Some(0) => return Err(self.invalid("limits.idempotency_store_bytes", "must be at least 1")),
                Some(n) => n,
            },
            directory_ttl: self.duration(
                "limits.directory_ttl",
                l.directory_ttl.as_deref(),
                Duration::from_secs(60),
            )?,
            negative_ttl: self.duration("limits.negative_ttl", l.negative_ttl.as_deref(), Duration::from_secs(10))?,
            negative_capacity: match l.negative_capacity {
                None => 100_000,
                Some(0) => return Err(self.invalid("limits.negative_capacity", "must be at least 1")),
                Some(n) => n,
            },
            shadow: l.shadow.unwrap_or(false),
            balance_status: match l.balance_status {
                None | Some(402) => 402,
                Some(429) => 429,
                Some(other) => {
                    return Err(self.invalid("limits.balance_status", format!("expected 402 or 429, not {other}")))
                }
            },
            max_clients: match l.max_clients {
                None => 100_000,
                Some(0) => return Err(self.invalid("limits.max_clients", "must be at least 1")),
                Some(n) => n,
            },
            hold_timeout: {
                let d =
                    self.duration("limits.hold_timeout", l.hold_timeout.as_deref(), Duration::from_secs(15 * 60))?;
                if d < Duration::from_secs(1) || d > MAX_HOLD_TIMEOUT {
                    return Err(self.invalid("limits.hold_timeout", "must be from 1s to 24h"));
                }
                d
            },
            max_holds: match l.max_holds {
                None => 10_000,
                Some(0) => return Err(self.invalid("limits.max_holds", "must be at least 1")),
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            },
            max_holds_per_tenant: match l.max_holds_per_tenant {
                // At most the node's: a node of few holds shares them as it did.
                None => 1_000.min(l.max_holds.map_or(10_000, |n| usize::try_from(n).unwrap_or(usize::MAX))),
                Some(0) => return Err(self.invalid("limits.max_holds_per_tenant", "must be at least 1")),
                Some(n) if l.max_holds.is_some_and(|m| n > m) || (l.max_holds.is_none() && n > 10_000) => {
                    return Err(self.invalid("limits.max_holds_per_tenant", "must be at most limits.max_holds"))
                }
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            },
            reservation_expiry: {
                let idle =
                    self.duration("limits.idle_timeout", l.idle_timeout.as_deref(), Duration::from_secs(15 * 60))?;
                let d = self.duration(
                    "limits.reservation_expiry",
                    l.reservation_expiry.as_deref(),
                    Duration::from_secs(30 * 60).max(idle * 2),
                )?;
                if d < idle * 2 || d < Duration::from_secs(300) || d > Duration::from_secs(30 * 86_400) {
                    return Err(self.invalid(
                        "limits.reservation_expiry",
                        "must be at least twice limits.idle_timeout (an idle tenant's lease is renewed or \
                         returned within it), at least 5m (a tenth of it is the clock skew tolerated), and \
                         at most 30 days",
                    ));
                }
                d
            },
            place_ttl: {
                let d = self.duration("limits.place_ttl", l.place_ttl.as_deref(), Duration::from_secs(30))?;
                if d < Duration::from_secs(10) || d > Duration::from_secs(3600) {
                    return Err(self.invalid(
                        "limits.place_ttl",
                        "must be from 10s (a node renews its places every third of it, with a pass a second) to 1h",
                    ));
                }
                d
            },
            fleet_size_hint_set: l.fleet_size_hint.is_some(),
            fleet_size_hint: match l.fleet_size_hint {
                None => 1,
                Some(n @ 1..=10_000) => n as u32,
                Some(n) => {
                    return Err(
                        self.invalid("limits.fleet_size_hint", format!("a number of nodes from 1 to 10000, not {n}"))
                    )
                }
            },
            background_timeout: {
                let d = self.duration(
                    "limits.background_timeout",
                    l.background_timeout.as_deref(),
                    Duration::from_secs(10),
                )?;
                if d.is_zero() {
                    return Err(self.invalid("limits.background_timeout", "must be longer than zero"));
                }
                d
            },
        })
    }
}
