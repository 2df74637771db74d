//! From the TOML text to a validated [`Config`], with positions for every error.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    num::{NonZeroU32, NonZeroU64},
    time::Duration,
};

use toml::de::{DeTable, DeValue};

use super::RoutePattern;
use super::{
    raw::{
        RawConfig, RawCredits, RawEvents, RawExport, RawIdentify, RawLimits, RawMeter, RawMetronome, RawOverride,
        RawPlan, RawQuota, RawRoute, RawStore, RawStripe, RawTenant, RawUsage,
    },
    ClientSettings, Config, ConfigError, ConfigErrorKind as Kind, CreditSettings, EventSettings, ExportSettings,
    HeaderStyle, Identify, Limits, MeterAggregation, MeterId, MeterSpec, MetronomeSettings, Migrate, OnUnknown, Period,
    PlanId, PlanOverride, PlanSpec, PostgresSettings, QuotaMode, QuotaSpec, Rate, RefundPolicy, RouteSpec, SinkKind,
    StatusSet, StoreErrorPolicy, StoreOrigin, StoreRole, StoreRoles, StoreSettings, StripeSettings, Synchronous,
    TenantId, TenantSpec, UsageSettings,
};
use crate::base::KeyHash;

/// The document with spans, to place errors found after deserialization.
struct Located<'a> {
    text: &'a str,
    root: Option<DeValue<'a>>,
}

impl Located<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// The position of the value at `path` (dotted, with `[i]` for array items), or of its
    /// closest ancestor present in the document.
    fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut node = self.root.as_ref()?;
        let mut span = None;
        for segment in split_path(path) {
            let next = match segment {
                Segment::Key(k) => node.get(k),
                Segment::Index(i) => node.get(i),
            };
            match next {
                Some(spanned) => {
                    span = Some(spanned.span());
                    node = spanned.get_ref();
                }
                None => break,
            }
        }
        span.map(|s| self.position(s.start))
    }

    /// The position of the value at `path` only if it is in the document.
    fn find_exact(&self, path: &str) -> Option<(usize, usize)> {
        let mut node = self.root.as_ref()?;
        let mut span = None;
        for segment in split_path(path) {
            let Segment::Key(k) = segment else { return None };
            let spanned = node.get(k)?;
            span = Some(spanned.span());
            node = spanned.get_ref();
        }
        span.map(|s| self.position(s.start))
    }

    fn error(&self, kind: Kind, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(kind, path, message).at(self.find(path))
    }
}

enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

fn split_path(path: &str) -> impl Iterator<Item = Segment<'_>> {
    // Parts split at dots outside quotes: `stripe.events."customer.subscription.deleted"`.
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in path.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => {
                parts.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&path[start..]);
    parts.into_iter().filter(|s| !s.is_empty()).flat_map(|part| {
        if let Some(key) = part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            return std::iter::once(Segment::Key(key)).chain(None);
        }
        let (key, rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        let index = rest.trim_end_matches(']').parse().ok();
        std::iter::once(Segment::Key(key)).chain(index.map(Segment::Index))
    })
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => return Err(syntax_error(text, &e)),
    };
    if root.get_ref().is_empty() {
        // A file that declares nothing is more likely a wrong path or a truncated file than a
        // deliberate configuration with no plans (which any key at all still allows).
        return Err(ConfigError::new(
            Kind::InvalidValue,
            "",
            "the file declares nothing (no plans, meters, routes or tenants): \
             an empty configuration is rejected rather than taken to mean \"reject everyone\"",
        )
        .at(Some((1, 1))));
    }
    let loc = Located { text, root: Some(DeValue::Table(root.get_ref().clone())) };
    let raw: RawConfig = {
        let de = toml::Deserializer::from(root);
        serde_path_to_error::deserialize(de).map_err(|e| serde_error(&loc, e))?
    };
    Validator { loc: &loc }.config(raw)
}

/// A TOML syntax error; a duplicate key is named by its full key path.
/// A tenant's overrides in their JSON form (the store's directory), checked as the file's are.
pub(super) fn parse_override(json: &str, config: &Config) -> Result<PlanOverride, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(json);
    let raw: RawOverride = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { "overrides".to_owned() } else { format!("overrides.{path}") };
        ConfigError::new(Kind::InvalidValue, key, e.inner().to_string())
    })?;
    let loc = Located { text: "", root: None };
    Validator { loc: &loc }.plan_override("overrides", &raw, &config.meters)
}

fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let loc = Located { text, root: None };
    let span = e.span();
    let pos = span.as_ref().map(|s| loc.position(s.start));
    let message = e.message().trim();
    let key = match (&span, message.starts_with("duplicate key")) {
        (Some(span), true) => duplicate_key_path(text, span.clone()).unwrap_or_default(),
        _ => String::new(),
    };
    let message = if key.is_empty() {
        message.to_owned()
    } else {
        format!("{message}: this key is already defined earlier in the file")
    };
    ConfigError::new(Kind::Syntax, key, message).at(pos)
}

/// The key path of the duplicate key at `span`. The parser reports only the key's span, and
/// keeps only the first definition; so the duplicate is renamed to a placeholder, the text is
/// parsed again, and the placeholder's path in that document is the duplicate's path.
fn duplicate_key_path(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let raw = text.get(span.clone())?;
    let name = raw.trim_matches(|c| c == '"' || c == '\'');
    let placeholder = format!("tollgate-duplicate-key-{}-{}", span.start, span.end);
    let renamed = format!("{}{placeholder}{}", &text[..span.start], &text[span.end..]);
    let (root, _) = DeTable::parse_recoverable(&renamed);
    let mut path = String::new();
    find_key(root.get_ref(), &placeholder, &mut path)
        .then(|| format!("{}{name}", &path[..path.len() - placeholder.len()]))
}

/// Whether `table` holds the key `needle` somewhere below it; if so `path` ends with its path.
fn find_key(table: &DeTable<'_>, needle: &str, path: &mut String) -> bool {
    let len = path.len();
    for (key, value) in table {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if key.get_ref() == needle || find_in_value(value.get_ref(), needle, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn find_in_value(value: &DeValue<'_>, needle: &str, path: &mut String) -> bool {
    match value {
        DeValue::Table(t) => find_key(t, needle, path),
        DeValue::Array(items) => {
            let len = path.len();
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                if find_in_value(item.get_ref(), needle, path) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        _ => false,
    }
}

fn serde_error(loc: &Located<'_>, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let mut path = e.path().to_string();
    if path == "." {
        path.clear();
    }
    let inner = e.into_inner();
    let message = inner.message().trim().to_owned();
    let (kind, path) = match message.strip_prefix("unknown field `") {
        Some(rest) => {
            let field = rest.split('`').next().unwrap_or_default();
            let full = if path.is_empty() {
                field.to_owned()
            } else if path == field || path.ends_with(&format!(".{field}")) {
                path
            } else {
                format!("{path}.{field}")
            };
            (Kind::UnknownKey, full)
        }
        None => (Kind::InvalidValue, path),
    };
    let pos = inner.span().map(|s| loc.position(s.start)).or_else(|| loc.find(&path));
    ConfigError::new(kind, path, message).at(pos)
}

/// The longest `usage.grace`: Stripe accepts meter events up to 35 days old.
const MAX_GRACE: Duration = Duration::from_secs(35 * 86_400);

struct Validator<'l, 'a> {
    loc: &'l Located<'a>,
}

/// What the headers of a stored response are allowed beside its body, when the store's bound
/// is checked against `limits.idempotency_max_body`.
const HEADERS_ALLOWANCE: u64 = 8 * 1024;

impl Validator<'_, '_> {
    fn invalid(&self, path: &str, message: impl Into<String>) -> ConfigError {
        self.loc.error(Kind::InvalidValue, path, message)
    }

    fn duration(&self, path: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
        let d = self.duration_or_zero(path, value, default)?;
        if d.is_zero() {
            return Err(self.invalid(path, "must be longer than zero"));
        }
        Ok(d)
    }

    /// A duration where zero means "off".
    fn duration_or_zero(&self, path: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        humantime::parse_duration(value)
            .map_err(|e| self.invalid(path, format!("{e}: write a duration such as \"10s\", \"15m\", \"1h\"")))
    }

    /// One of the nine standard HTTP methods, in any case (`http::Method` alone would take any
    /// token, such as a misspelt `GETT`, as an extension method).
    fn method(&self, path: &str, value: &str) -> Result<http::Method, ConfigError> {
        const METHODS: [http::Method; 9] = [
            http::Method::GET,
            http::Method::HEAD,
            http::Method::POST,
            http::Method::PUT,
            http::Method::DELETE,
            http::Method::CONNECT,
            http::Method::OPTIONS,
            http::Method::TRACE,
            http::Method::PATCH,
        ];
        METHODS.into_iter().find(|m| m.as_str().eq_ignore_ascii_case(value)).ok_or_else(|| {
            self.invalid(
                path,
                format!("`{value}` is not an HTTP method: expected GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE or PATCH"),
            )
        })
    }

    fn policy(&self, path: &str, value: &str) -> Result<StoreErrorPolicy, ConfigError> {
        match value {
            "fail-open" => Ok(StoreErrorPolicy::FailOpen),
            "fail-closed" => Ok(StoreErrorPolicy::FailClosed),
            _ => Err(self.invalid(path, "expected \"fail-open\" or \"fail-closed\"")),
        }
    }

    fn positive(&self, path: &str, value: i64) -> Result<NonZeroU64, ConfigError> {
        u64::try_from(value)
            .ok()
            .and_then(NonZeroU64::new)
            .ok_or_else(|| self.invalid(path, format!("must be a whole number of at least 1, not {value}")))
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let meters = self.meters(&raw.meters)?;
        let default_meter =
            self.meter_ref(&meters, "usage.default_meter", raw.usage.default_meter.as_deref().unwrap_or("requests"))?;
        let plans = self.plans(&raw.plans, &meters)?;
        let (identify, on_unknown) = self.identify(&raw.identify, &plans)?;
        let clients = self.clients(&raw.identify)?;
        let limits = self.limits(&raw.limits)?;
        let usage = self.usage(&raw.usage)?;
        for m in &meters {
            if let Some(w) = m.aggregation.window_secs() {
                if w % usage.window.as_secs() as i64 != 0 {
                    return Err(self.invalid(
                        &format!("meters.{}.aggregation", m.id),
                        format!(
                            "usage.window ({}s) must divide the meter's window ({w}s): \
                             each tollgate window must fall inside one window of the billing meter",
                            usage.window.as_secs()
                        ),
                    ));
                }
            }
        }
        let export = self.export(&raw.export)?;
        let stripe = raw.stripe.as_ref().map(|s| self.stripe(s, &plans)).transpose()?;
        let metronome = raw.metronome.as_ref().map(|m| self.metronome(m)).transpose()?;
        // Metronome's timeout applies with its sink even without a `[metronome]` section.
        let metronome_timeout = metronome
            .as_ref()
            .map(|m| m.timeout)
            .or((export.sink == Some(SinkKind::Metronome)).then_some(Duration::from_secs(30)));
        if metronome.is_some() && export.sink != Some(SinkKind::Metronome) {
            return Err(self.invalid(
                "metronome",
                "a [metronome] section without export.sink = \"metronome\": usage would not go to Metronome; \
                 set the sink (one sink at a time) or remove the section",
            ));
        }
        for (section, timeout) in [("stripe", stripe.as_ref().map(|s| s.timeout)), ("metronome", metronome_timeout)] {
            // A claim must outlast the call it covers, or another node could send the same
            // event while the first call is still under way.
            if timeout.is_some_and(|t| export.claim < t * 2) {
                return Err(self.invalid(
                    "export.claim",
                    format!(
                        "must be at least twice {section}.timeout ({}s): a claim must outlast the call it covers",
                        timeout.unwrap_or_default().as_secs()
                    ),
                ));
            }
        }
        if export.sink == Some(SinkKind::Stripe) && stripe.is_none() {
            return Err(
                self.invalid("export.sink", "\"stripe\" needs a [stripe] section (its api_base, timeout and key file)")
            );
        }
        if export.sink == Some(SinkKind::Metronome) {
            // Metronome sums events: a pre-aggregated meter's running totals would be added up.
            if let Some(m) = meters.iter().find(|m| m.aggregation != MeterAggregation::Sum) {
                return Err(self.invalid(
                    &format!("meters.{}.aggregation", m.id),
                    "a pre-aggregated meter (\"hour\", \"day\") is a Stripe Billing Meters notion: with \
                     export.sink = \"metronome\" use \"sum\" and let the billable metric aggregate",
                ));
            }
        }
        let routes = self.routes(&raw.routes, &meters, &default_meter, &plans)?;
        let events = self.events(&raw.events, &meters)?;
        self.hard_quotas_are_reachable(&plans, &routes, &default_meter, &events)?;
        let tenants = self.tenants(&raw.tenants, &plans, &meters, &routes, &default_meter, &events)?;
        if matches!(on_unknown, OnUnknown::Anonymous(_)) && tenants.iter().any(|t| t.id.as_str() == ANONYMOUS_TENANT) {
            return Err(self.loc.error(
                Kind::Conflict,
                &format!("tenants.{ANONYMOUS_TENANT}"),
                "`anonymous` is the tenant of unknown callers (identify.unknown = \"anonymous\"): name this tenant otherwise",
            ));
        }
        let (store, store_roles, store_written) = match &raw.store {
            None => (StoreSettings::default(), StoreRoles::default(), None),
            Some(raw) => {
                let (store, roles) = self.stores(raw)?;
                let mut origin = StoreOrigin { section: self.loc.find("store"), ..StoreOrigin::default() };
                for key in [
                    "kind",
                    "path",
                    "synchronous",
                    "table",
                    "endpoint",
                    "url",
                    "schema",
                    "pool_size",
                    "statement_timeout",
                    "migrate",
                    "ca_file",
                ] {
                    if let Some(pos) = self.loc.find_exact(&format!("store.{key}")) {
                        origin.keys.insert(key, pos);
                    }
                }
                for role in ["quota", "usage", "directory", "idempotency"] {
                    if let Some(pos) = self.loc.find_exact(&format!("store.{role}")) {
                        origin.keys.insert(role, pos);
                    }
                }
                (store, roles, Some(origin))
            }
        };
        let dynamo =
            matches!(store_roles.get(StoreRole::Idempotency).unwrap_or(&store), StoreSettings::Dynamodb { .. });
        // A window's share of the store's bytes (DynamoDB's in 16 counters) must hold one
        // response of the longest stored body with its headers (allowed 8 KiB), or every such
        // response is refused.
        let parts = if dynamo { 32 } else { 2 };
        let longest = limits.idempotency_max_body.saturating_add(HEADERS_ALLOWANCE);
        if limits.idempotency_store_bytes / parts < longest {
            return Err(self.invalid(
                "limits.idempotency_store_bytes",
                format!(
                    "must be at least {} bytes: {parts} times limits.idempotency_max_body ({}) and 8 KiB of \
                     headers{}, so that each window's share holds one response of the longest stored body",
                    longest.saturating_mul(parts),
                    limits.idempotency_max_body,
                    if dynamo { " (a DynamoDB idempotency store splits a window's half in 16 counters)" } else { "" },
                ),
            ));
        }
        if dynamo && limits.idempotency_max_body > crate::base::DYNAMODB_MAX_RESPONSE_BYTES as u64 {
            return Err(self.invalid(
                "limits.idempotency_max_body",
                format!(
                    "at most {} bytes on a DynamoDB idempotency store (an item holds 400 KB, its attribute \
                     names and the response's headers included)",
                    crate::base::DYNAMODB_MAX_RESPONSE_BYTES
                ),
            ));
        }
        Ok(Config {
            identify,
            on_unknown,
            limits,
            usage,
            meters,
            default_meter,
            plans,
            routes,
            tenants,
            store,
            store_roles,
            store_written,
            export,
            stripe,
            metronome,
            events,
            clients,
            file: None,
        })
    }

    /// `[identify]` `trusted_proxies` and `ipv6_prefix`.
    fn clients(&self, raw: &RawIdentify) -> Result<ClientSettings, ConfigError> {
        let mut settings = ClientSettings::default();
        for (i, r) in raw.trusted_proxies.iter().flatten().enumerate() {
            let range =
                super::IpRange::parse(r).map_err(|m| self.invalid(&format!("identify.trusted_proxies[{i}]"), m))?;
            settings.trusted_proxies.push(range);
        }
        settings.forwarded_header = match raw.forwarded_header.as_deref() {
            None | Some("x-forwarded-for") => super::ForwardedHeader::XForwardedFor,
            Some("forwarded") => super::ForwardedHeader::Forwarded,
            Some(other) => {
                return Err(self.invalid(
                    "identify.forwarded_header",
                    format!("expected \"x-forwarded-for\" or \"forwarded\", not \"{other}\""),
                ))
            }
        };
        if let Some(p) = raw.ipv6_prefix {
            settings.ipv6_prefix = u8::try_from(p)
                .ok()
                .filter(|p| (1..=128).contains(p))
                .ok_or_else(|| self.invalid("identify.ipv6_prefix", format!("must be 1 to 128, not {p}")))?;
        }
        if let Some(r) = &raw.unknown_key_rate {
            settings.unknown_key_rate = r
                .parse::<Rate>()
                .map_err(|e| self.invalid("identify.unknown_key_rate", format!("{e}, not \"{r}\"")))?;
        }
        Ok(settings)
    }

    /// `[events]`.
    fn events(&self, raw: &RawEvents, meters: &[MeterSpec]) -> Result<EventSettings, ConfigError> {
        let d = EventSettings::default();
        let max_skew = self.duration("events.max_skew", raw.max_skew.as_deref(), d.max_skew)?;
        if max_skew > Duration::from_secs(3600) {
            return Err(self.invalid("events.max_skew", "must be at most 1 hour"));
        }
        let mut products = BTreeMap::new();
        for (code, meter) in &raw.products {
            let path = format!("events.products.{code}");
            if code.is_empty() || code.len() > 256 {
                return Err(self.invalid(&path, "a product code is 1 to 256 bytes"));
            }
            products.insert(code.clone(), self.meter_ref(meters, &path, meter)?);
        }
        let store_timeout = self.duration("events.store_timeout", raw.store_timeout.as_deref(), d.store_timeout)?;
        if store_timeout.is_zero() {
            return Err(self.invalid("events.store_timeout", "must be longer than zero"));
        }
        Ok(EventSettings { max_skew, products, store_timeout })
    }

    /// `[export]`.
    fn export(&self, raw: &RawExport) -> Result<ExportSettings, ConfigError> {
        let d = ExportSettings::default();
        let count = |path: &str, v: Option<u64>, default: u64, max: u64| -> Result<u64, ConfigError> {
            match v {
                None => Ok(default),
                Some(n) if (1..=max).contains(&n) => Ok(n),
                Some(n) => Err(self.invalid(path, format!("must be between 1 and {max}, not {n}"))),
            }
        };
        let export = ExportSettings {
            interval: self.duration("export.interval", raw.interval.as_deref(), d.interval)?,
            concurrency: count("export.concurrency", raw.concurrency, d.concurrency as u64, 1000)? as usize,
            // Stripe takes 1,000 calls/s in live mode (100 in test mode).
            calls_per_second: count(
                "export.calls_per_second",
                raw.calls_per_second,
                u64::from(d.calls_per_second),
                1000,
            )? as u32,
            claim: self.duration("export.claim", raw.claim.as_deref(), d.claim)?,
            // With Metronome, as long as its de-duplication allows: an export in doubt is sent
            // again under its transaction id for 33 days before it is parked.
            unconfirmed_after: self.duration(
                "export.unconfirmed_after",
                raw.unconfirmed_after.as_deref(),
                if raw.sink.as_deref() == Some("metronome") {
                    crate::base::SinkLimits::METRONOME.max_unconfirmed
                } else {
                    d.unconfirmed_after
                },
            )?,
            max_unknown_failures: count("export.max_unknown_failures", raw.max_unknown_failures, 8, 1000)? as u32,
            reconcile_after: self.duration(
                "export.reconcile_after",
                raw.reconcile_after.as_deref(),
                d.reconcile_after,
            )?,
            reconcile_interval: self.duration_or_zero(
                "export.reconcile_interval",
                raw.reconcile_interval.as_deref(),
                d.reconcile_interval,
            )?,
            sink: match raw.sink.as_deref() {
                None => None,
                Some("stripe") => Some(SinkKind::Stripe),
                Some("metronome") => Some(SinkKind::Metronome),
                Some("jsonl") => Some(SinkKind::Jsonl),
                Some(other) => {
                    return Err(self.invalid(
                        "export.sink",
                        format!("`{other}` is not a billing sink: expected \"stripe\", \"metronome\" or \"jsonl\""),
                    ))
                }
            },
            file: match raw.file.as_deref() {
                Some(p) if p.trim().is_empty() => return Err(self.invalid("export.file", "must not be empty")),
                p => p.map(std::path::PathBuf::from),
            },
        };
        if export.reconcile_after < Duration::from_secs(60) || export.reconcile_after > Duration::from_secs(7 * 86_400)
        {
            return Err(self.invalid(
                "export.reconcile_after",
                "must be between 1 minute and 7 days: Stripe's summaries settle in minutes, and what is exported \
                 is kept 35 days",
            ));
        }
        if !export.reconcile_interval.is_zero() && export.reconcile_interval < Duration::from_secs(60) {
            return Err(self.invalid("export.reconcile_interval", "must be 0 (off) or at least 1 minute"));
        }
        if export.sink == Some(SinkKind::Metronome) {
            if export.unconfirmed_after > crate::base::SinkLimits::METRONOME.max_unconfirmed {
                return Err(self.invalid(
                    "export.unconfirmed_after",
                    "must be at most 33 days: Metronome de-duplicates transaction ids over 34 days only, so a \
                     later re-send could be billed twice",
                ));
            }
        } else if export.unconfirmed_after > crate::base::SinkLimits::STRIPE.max_unconfirmed {
            return Err(self.invalid(
                "export.unconfirmed_after",
                "must be at most 23 hours: Stripe de-duplicates meter event identifiers over about 24 hours only, \
                 so a later re-send could be billed twice",
            ));
        }
        match (export.sink, &export.file) {
            (Some(SinkKind::Jsonl), None) => {
                return Err(self.invalid("export.sink", "\"jsonl\" needs export.file, the file events are appended to"))
            }
            (Some(SinkKind::Jsonl), Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(self.invalid("export.file", "is the file of export.sink = \"jsonl\" only"));
            }
        }
        Ok(export)
    }

    /// `[metronome]`: no token here (it comes from the environment or a file).
    fn metronome(&self, raw: &RawMetronome) -> Result<MetronomeSettings, ConfigError> {
        let api_base = match &raw.api_base {
            None => None,
            Some(url) if host_only(url) => Some(if url.ends_with('/') { url.clone() } else { format!("{url}/") }),
            Some(_) => {
                return Err(self.invalid(
                    "metronome.api_base",
                    "expected an http:// or https:// URL (no path after the host: `v1/ingest` is appended)",
                ))
            }
        };
        let api_token_file = match &raw.api_token_file {
            Some(p) if p.trim().is_empty() => return Err(self.invalid("metronome.api_token_file", "must not be empty")),
            p => p.as_ref().map(std::path::PathBuf::from),
        };
        let timeout = self.duration("metronome.timeout", raw.timeout.as_deref(), Duration::from_secs(30))?;
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(300) {
            return Err(self.invalid("metronome.timeout", "must be between 1 second and 5 minutes"));
        }
        Ok(MetronomeSettings { api_base, api_token_file, timeout })
    }

    /// `[stripe]`: no secret here (they come from the environment or a file), plans that
    /// exist, statuses Stripe has.
    /// `[stripe.credits]`.
    fn credits(&self, raw: &RawCredits, plans: &BTreeMap<PlanId, PlanSpec>) -> Result<CreditSettings, ConfigError> {
        let meter = MeterId::from(raw.meter.as_str());
        let prepaid = plans.values().any(|p| p.quotas.get(&meter).is_some_and(|q| q.period == Period::Prepaid));
        if !prepaid {
            return Err(self.invalid(
                "stripe.credits.meter",
                format!(
                    "no plan has a prepaid balance on `{}`: add quotas.{} = {{ period = \"prepaid\" }} to the plans that sell it",
                    raw.meter, raw.meter
                ),
            ));
        }
        let mut prices = BTreeMap::new();
        for (price, units) in &raw.prices {
            let path = format!("stripe.credits.prices.{price}");
            let units = self.positive(&path, *units)?.get();
            if units > crate::base::MAX_BALANCE {
                return Err(self.invalid(&path, "at most 2^50 units"));
            }
            prices.insert(price.clone(), units);
        }
        let expires_after = match raw.expires_after.as_deref() {
            None => None,
            Some(v) => Some(self.duration("stripe.credits.expires_after", Some(v), Duration::ZERO)?),
        };
        let refunds = match raw.refunds.as_deref().unwrap_or("proportional") {
            "proportional" => RefundPolicy::Proportional,
            "unspent" => RefundPolicy::Unspent,
            "ignore" => RefundPolicy::Ignore,
            other => {
                return Err(self.invalid(
                    "stripe.credits.refunds",
                    format!("expected \"proportional\", \"unspent\" or \"ignore\", not \"{other}\""),
                ))
            }
        };
        let refund_attribution = match raw.refund_attribution.as_deref().unwrap_or("pro_rata") {
            "pro_rata" => crate::base::RefundAttribution::ProRata,
            "credits_first" => crate::base::RefundAttribution::CreditsFirst,
            other => {
                return Err(self.invalid(
                    "stripe.credits.refund_attribution",
                    format!("expected \"pro_rata\" or \"credits_first\", not \"{other}\""),
                ))
            }
        };
        Ok(CreditSettings { meter, prices, expires_after, refunds, refund_attribution })
    }

    fn stripe(&self, raw: &RawStripe, plans: &BTreeMap<PlanId, PlanSpec>) -> Result<StripeSettings, ConfigError> {
        const STATUSES: [&str; 8] =
            ["incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"];
        let api_base = match &raw.api_base {
            None => None,
            Some(url) if host_only(url) => Some(if url.ends_with('/') { url.clone() } else { format!("{url}/") }),
            Some(_) => {
                return Err(
                    self.invalid("stripe.api_base", "expected an http:// or https:// URL (no path after the host)")
                )
            }
        };
        let file = |key: &str, v: &Option<String>| -> Result<Option<std::path::PathBuf>, ConfigError> {
            match v {
                Some(p) if p.trim().is_empty() => Err(self.invalid(&format!("stripe.{key}"), "must not be empty")),
                v => Ok(v.as_ref().map(std::path::PathBuf::from)),
            }
        };
        let mut events = BTreeMap::new();
        for (event, plan) in &raw.events {
            let path = format!("stripe.events.\"{event}\"");
            if !event.contains('.') || event.contains(char::is_whitespace) {
                return Err(self.invalid(&path, "expected a Stripe event type such as \"payment_method.attached\""));
            }
            #[cfg(feature = "stripe")]
            if let Ok(stripe_webhook::EventType::Unknown(_)) = event.parse::<stripe_webhook::EventType>() {
                return Err(self.invalid(
                    &path,
                    format!(
                        "Stripe does not send `{event}` (not an event type of the API version tollgate's Stripe \
                         client knows): check its spelling, e.g. \"customer.subscription.deleted\""
                    ),
                ));
            }
            events.insert(event.clone(), self.plan_ref(plans, &path, plan)?);
        }
        let mut subscription_status = BTreeMap::new();
        for (status, plan) in &raw.subscription_status {
            let path = format!("stripe.subscription_status.{status}");
            if !STATUSES.contains(&status.as_str()) {
                return Err(self.invalid(
                    &path,
                    format!("`{status}` is not a subscription status: expected one of {}", STATUSES.join(", ")),
                ));
            }
            let outcome = if plan == "ignore" {
                if plans.contains_key(&PlanId::from("ignore")) {
                    return Err(self.invalid(
                        &path,
                        "`ignore` is both a plan and the keyword that leaves the tenant as it is: rename the plan",
                    ));
                }
                super::StatusOutcome::Ignore
            } else {
                super::StatusOutcome::Plan(self.plan_ref(plans, &path, plan)?)
            };
            subscription_status.insert(status.clone(), outcome);
        }
        let mut prices = BTreeMap::new();
        for (price, plan) in &raw.prices {
            let path = format!("stripe.prices.{price}");
            prices.insert(price.clone(), self.plan_ref(plans, &path, plan)?);
        }
        // Subscriptions mapped at all: every status has an outcome (`paused` left unmapped kept
        // a tenant on its paid plan). `active` and `trialing` go by price when prices are.
        if !raw.prices.is_empty() || !subscription_status.is_empty() {
            let missing: Vec<&str> = STATUSES
                .into_iter()
                .filter(|s| {
                    let by_price = matches!(*s, "active" | "trialing") && !raw.prices.is_empty();
                    !by_price && !subscription_status.contains_key(*s)
                })
                .collect();
            if !missing.is_empty() {
                return Err(self.invalid(
                    "stripe.subscription_status",
                    format!(
                        "every subscription status needs an outcome, a plan or \"ignore\" (`active` and `trialing` \
                         may go by [stripe.prices]): missing {}",
                        missing.join(", ")
                    ),
                ));
            }
        }
        let mut plan_order: Vec<PlanId> = Vec::new();
        for (i, plan) in raw.plan_order.iter().enumerate() {
            let path = format!("stripe.plan_order[{i}]");
            let id = self.plan_ref(plans, "stripe.plan_order", plan).map_err(|_| {
                self.invalid("stripe.plan_order", format!("unknown plan `{plan}` ({path}): declare it under [plans]"))
            })?;
            if plan_order.contains(&id) {
                return Err(self.invalid("stripe.plan_order", format!("`{plan}` is listed twice")));
            }
            plan_order.push(id);
        }
        // Several plans by price: which wins when a customer has several subscriptions must be
        // said (the latest event would, and a renewal of the cheaper one would downgrade).
        let priced: std::collections::BTreeSet<&PlanId> = prices.values().collect();
        if priced.len() > 1 {
            let missing: Vec<&str> = priced.iter().filter(|p| !plan_order.contains(p)).map(|p| p.as_str()).collect();
            if !missing.is_empty() {
                return Err(self.invalid(
                    "stripe.plan_order",
                    format!(
                        "[stripe.prices] gives several plans: list them in [stripe] plan_order, highest first, so \
                         that a customer with several subscriptions gets the highest (missing {})",
                        missing.join(", ")
                    ),
                ));
            }
        }
        let credits = raw.credits.as_ref().map(|c| self.credits(c, plans)).transpose()?;
        Ok(StripeSettings {
            credits,
            api_base,
            secret_key_file: file("secret_key_file", &raw.secret_key_file)?,
            webhook_secret_file: file("webhook_secret_file", &raw.webhook_secret_file)?,
            event_destination_secret_file: file("event_destination_secret_file", &raw.event_destination_secret_file)?,
            timeout: self.duration("stripe.timeout", raw.timeout.as_deref(), Duration::from_secs(30))?,
            invoice_grace: {
                let grace =
                    self.duration("stripe.invoice_grace", raw.invoice_grace.as_deref(), Duration::from_secs(3600))?;
                if grace > Duration::from_secs(72 * 3600) {
                    return Err(self.invalid(
                        "stripe.invoice_grace",
                        "at most 72h: Stripe finalizes an invoice at most 72 hours after its period ends",
                    ));
                }
                grace
            },
            events,
            subscription_status,
            prices,
            plan_order,
        })
    }

    /// The `[store]` section and its role sections: a store for every role, and the stores of
    /// the roles that have one of their own.
    fn stores(&self, raw: &RawStore) -> Result<(StoreSettings, StoreRoles), ConfigError> {
        let store = self.store(raw, "store")?;
        let role = |name: &str, r: &Option<Box<RawStore>>| -> Result<Option<StoreSettings>, ConfigError> {
            let Some(r) = r else { return Ok(None) };
            let at = format!("store.{name}");
            for (nested, set) in [
                ("quota", r.quota.is_some()),
                ("usage", r.usage.is_some()),
                ("directory", r.directory.is_some()),
                ("idempotency", r.idempotency.is_some()),
            ] {
                if set {
                    return Err(self.invalid(
                        &format!("{at}.{nested}"),
                        "a role's store is named under [store], not under another role",
                    ));
                }
            }
            self.store(r, &at).map(Some)
        };
        let roles = StoreRoles {
            quota: role("quota", &raw.quota)?,
            usage: role("usage", &raw.usage)?,
            directory: role("directory", &raw.directory)?,
            idempotency: role("idempotency", &raw.idempotency)?,
        };
        self.one_kind_of_sharing(&store, &roles)?;
        Ok((store, roles))
    }

    /// Every role of a fleet is shared: a store the nodes share (DynamoDB) for one role and one
    /// node's own (memory, a SQLite file) for another is refused, at the role's section. With
    /// one node's quota store each node would count alone (the fleet admitting N times a hard
    /// limit); with one node's idempotency store a replay sent to another node would run again;
    /// with one node's directory a webhook's plan change would reach one node; with one node's
    /// usage store two nodes would export the same window.
    fn one_kind_of_sharing(&self, store: &StoreSettings, roles: &StoreRoles) -> Result<(), ConfigError> {
        let of = |role: StoreRole| roles.get(role).unwrap_or(store);
        let written = self.loc.find_exact("store.kind").is_some() || self.loc.find_exact("store.path").is_some();
        let section = |role: StoreRole| {
            if roles.get(role).is_some() {
                format!("[store.{}]", role.name())
            } else if written {
                "[store]".to_owned()
            } else {
                "[store]'s default, a SQLite file tollgate.db".to_owned()
            }
        };
        let Some(shared) = StoreRole::ALL.into_iter().find(|r| of(*r).is_shared()) else { return Ok(()) };
        let Some(own) = StoreRole::ALL.into_iter().find(|r| !of(*r).is_shared()) else { return Ok(()) };
        // Placed at the role section involved: the node's own one if it has a section, else
        // the shared one (the node's own store then comes from `[store]`).
        let at = if roles.get(own).is_some() { own } else { shared };
        Err(self.invalid(
            &format!("store.{}.kind", at.name()),
            format!(
                "the {} role's store is {} (`{}`), shared by a fleet, but the {} role's is {} (`{}`), one node's own: \
                 every role of a fleet needs a shared store (with one node's store for a role, each node would keep \
                 its own {})",
                shared.name(),
                of(shared).kind(),
                section(shared),
                own.name(),
                of(own).kind(),
                section(own),
                match own {
                    StoreRole::Quota => "quota counts and the fleet would admit a hard limit once per node",
                    StoreRole::Idempotency => "idempotency keys and a replay sent to another node would run again",
                    StoreRole::Directory => "tenants and plans and a webhook's plan change would reach one node",
                    StoreRole::Usage => "usage and two nodes would export the same window",
                }
            ),
        ))
    }

    /// A store section (`[store]`, or a role's under it, at `at`): a known kind, and only the
    /// keys of that kind.
    fn store(&self, raw: &RawStore, at: &str) -> Result<StoreSettings, ConfigError> {
        let kind = raw.kind.as_deref().unwrap_or("sqlite");
        let only = |key: &str, set: bool, kinds: &str| {
            if set {
                Err(self
                    .invalid(&format!("{at}.{key}"), format!("`{key}` applies to kind = {kinds}, not to \"{kind}\"")))
            } else {
                Ok(())
            }
        };
        let text = |key: &str, value: &Option<String>| -> Result<Option<String>, ConfigError> {
            match value {
                Some(v) if v.trim().is_empty() => Err(self.invalid(&format!("{at}.{key}"), "must not be empty")),
                v => Ok(v.clone()),
            }
        };
        let postgres_only = || {
            for (key, set) in [
                ("url", raw.url.is_some()),
                ("schema", raw.schema.is_some()),
                ("pool_size", raw.pool_size.is_some()),
                ("statement_timeout", raw.statement_timeout.is_some()),
                ("migrate", raw.migrate.is_some()),
                ("ca_file", raw.ca_file.is_some()),
            ] {
                only(key, set, "\"postgres\"")?;
            }
            Ok::<_, ConfigError>(())
        };
        match kind {
            "memory" => {
                only("path", raw.path.is_some(), "\"sqlite\"")?;
                only("synchronous", raw.synchronous.is_some(), "\"sqlite\"")?;
                only("table", raw.table.is_some(), "\"dynamodb\"")?;
                only("endpoint", raw.endpoint.is_some(), "\"dynamodb\"")?;
                postgres_only()?;
                Ok(StoreSettings::Memory)
            }
            "sqlite" => {
                only("table", raw.table.is_some(), "\"dynamodb\"")?;
                only("endpoint", raw.endpoint.is_some(), "\"dynamodb\"")?;
                postgres_only()?;
                let path = text("path", &raw.path)?.unwrap_or_else(|| "tollgate.db".to_owned());
                let synchronous = match raw.synchronous.as_deref() {
                    None | Some("full") => Synchronous::Full,
                    Some("normal") => Synchronous::Normal,
                    Some(_) => {
                        return Err(self.invalid(&format!("{at}.synchronous"), "expected \"full\" or \"normal\""))
                    }
                };
                Ok(StoreSettings::Sqlite { path: path.into(), synchronous })
            }
            "dynamodb" => {
                only("path", raw.path.is_some(), "\"sqlite\"")?;
                only("synchronous", raw.synchronous.is_some(), "\"sqlite\"")?;
                postgres_only()?;
                let Some(table) = text("table", &raw.table)? else {
                    return Err(self.invalid(
                        &format!("{at}.table"),
                        "kind = \"dynamodb\" needs the table's name: table = \"...\"",
                    ));
                };
                Ok(StoreSettings::Dynamodb { table, endpoint: text("endpoint", &raw.endpoint)? })
            }
            "postgres" => {
                only("path", raw.path.is_some(), "\"sqlite\"")?;
                only("synchronous", raw.synchronous.is_some(), "\"sqlite\"")?;
                only("table", raw.table.is_some(), "\"dynamodb\"")?;
                only("endpoint", raw.endpoint.is_some(), "\"dynamodb\"")?;
                let mut p = PostgresSettings { url: text("url", &raw.url)?, ..PostgresSettings::default() };
                if let Some(schema) = text("schema", &raw.schema)? {
                    let plain = schema.len() <= 63
                        && !schema.starts_with("pg_")
                        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                        && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                    if !plain {
                        return Err(self.invalid(
                            &format!("{at}.schema"),
                            "a schema name is lower-case letters, digits and `_`, starting with a letter or `_` \
                             (not `pg_`), at most 63 bytes",
                        ));
                    }
                    p.schema = schema;
                }
                if let Some(size) = raw.pool_size {
                    p.pool_size = usize::try_from(size)
                        .ok()
                        .filter(|s| (1..=1024).contains(s))
                        .ok_or_else(|| self.invalid(&format!("{at}.pool_size"), "expected 1 to 1024 connections"))?;
                }
                p.statement_timeout = self.duration(
                    &format!("{at}.statement_timeout"),
                    raw.statement_timeout.as_deref(),
                    p.statement_timeout,
                )?;
                // PostgreSQL's statement_timeout is an int of milliseconds.
                if p.statement_timeout.as_millis() > i32::MAX as u128 {
                    return Err(self.invalid(&format!("{at}.statement_timeout"), "at most 24 days"));
                }
                p.migrate = match raw.migrate.as_deref() {
                    None | Some("auto") => Migrate::Auto,
                    Some("verify") => Migrate::Verify,
                    Some(_) => return Err(self.invalid(&format!("{at}.migrate"), "expected \"auto\" or \"verify\"")),
                };
                p.ca_file = text("ca_file", &raw.ca_file)?.map(Into::into);
                Ok(StoreSettings::Postgres(p))
            }
            other => Err(self.invalid(
                &format!("{at}.kind"),
                format!("unknown store kind `{other}`: expected \"sqlite\", \"memory\", \"dynamodb\" or \"postgres\""),
            )),
        }
    }

    /// A reference to a declared meter.
    fn meter_ref(&self, meters: &[MeterSpec], path: &str, name: &str) -> Result<MeterId, ConfigError> {
        match meters.iter().find(|m| m.id.as_str() == name) {
            Some(m) => Ok(m.id.clone()),
            None => Err(self.loc.error(
                Kind::UnknownReference,
                path,
                format!("unknown meter `{name}`: declare it under [meters]"),
            )),
        }
    }

    /// A reference to a declared plan.
    fn plan_ref(&self, plans: &BTreeMap<PlanId, PlanSpec>, path: &str, name: &str) -> Result<PlanId, ConfigError> {
        let id = PlanId::from(name);
        if plans.contains_key(&id) {
            Ok(id)
        } else {
            Err(self.loc.error(
                Kind::UnknownReference,
                path,
                format!("unknown plan `{name}`: declare it under [plans]"),
            ))
        }
    }

    /// `[meters]`: `requests` always exists.
    fn meters(&self, raw: &BTreeMap<String, RawMeter>) -> Result<Vec<MeterSpec>, ConfigError> {
        let mut meters = vec![MeterSpec {
            id: "requests".into(),
            event_name: "requests".into(),
            description: None,
            aggregation: MeterAggregation::Sum,
            export: true,
        }];
        for (name, m) in raw {
            let path = format!("meters.{name}");
            check_name(self, &path, name)?;
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
                export: m.export.unwrap_or(true),
            };
            // Stripe's limit for a meter's event_name.
            if spec.event_name.chars().count() > 100 {
                return Err(self.invalid(
                    &format!("{path}.event_name"),
                    "is longer than 100 characters, which Stripe refuses for a meter's event_name",
                ));
            }
            if name == "requests" {
                meters[0] = spec;
            } else {
                meters.push(spec);
            }
        }
        if meters.len() > 64 {
            return Err(self.invalid("meters", "at most 64 meters may be declared"));
        }
        // One Stripe meter per event_name: two meters sending one would be billed as one.
        let explicit = |m: &MeterSpec| raw.get(m.id.as_str()).is_some_and(|r| r.event_name.is_some());
        for (j, b) in meters.iter().enumerate() {
            if let Some(a) = meters[..j].iter().find(|a| a.event_name == b.event_name) {
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

    /// `[plans]`.
    fn plans(
        &self,
        raw: &BTreeMap<String, RawPlan>,
        meters: &[MeterSpec],
    ) -> Result<BTreeMap<PlanId, PlanSpec>, ConfigError> {
        let mut plans = BTreeMap::new();
        for (name, p) in raw {
            check_name(self, &format!("plans.{name}"), name)?;
            plans.insert(PlanId::from(name.as_str()), self.plan(name, p, meters)?);
        }
        Ok(plans)
    }

    /// `[identify]`: how tenants are identified, and what an unknown one gets.
    fn identify(
        &self,
        raw: &RawIdentify,
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<(Identify, OnUnknown), ConfigError> {
        let identify = match raw.source.as_deref().unwrap_or("api-key") {
            "api-key" => {
                let header = raw.header.as_deref().unwrap_or("x-api-key");
                let header = http::HeaderName::try_from(header)
                    .map_err(|_| self.invalid("identify.header", format!("`{header}` is not a valid header name")))?;
                Identify::ApiKey { header }
            }
            "extension" => {
                if raw.header.is_some() {
                    return Err(self.invalid("identify.header", "only used with source = \"api-key\""));
                }
                Identify::Extension
            }
            _ => return Err(self.invalid("identify.source", "expected \"api-key\" or \"extension\"")),
        };
        let on_unknown = match (raw.unknown.as_deref().unwrap_or("reject"), &raw.anonymous_plan) {
            ("reject", None) => OnUnknown::Reject,
            ("reject", Some(_)) => {
                return Err(self.invalid("identify.anonymous_plan", "only used with unknown = \"anonymous\""))
            }
            ("anonymous", Some(plan)) => {
                let id = self.plan_ref(plans, "identify.anonymous_plan", plan)?;
                if plans.get(&id).is_some_and(|p| p.concurrency.is_some()) {
                    return Err(self.invalid(
                        &format!("plans.{plan}.concurrency"),
                        "the anonymous plan serves every unknown caller as one tenant: a concurrency limit would \
                         be one count shared by all of them (one slow client would lock out the rest)",
                    ));
                }
                OnUnknown::Anonymous(id)
            }
            ("anonymous", None) => {
                return Err(self.invalid("identify.unknown", "unknown = \"anonymous\" needs anonymous_plan"))
            }
            _ => return Err(self.invalid("identify.unknown", "expected \"reject\" or \"anonymous\"")),
        };
        Ok((identify, on_unknown))
    }

    /// `[limits]`.
    fn limits(&self, l: &RawLimits) -> Result<Limits, ConfigError> {
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

    /// `[usage]` (but `default_meter`, read with the meters).
    fn usage(&self, u: &RawUsage) -> Result<UsageSettings, ConfigError> {
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
        let usage = UsageSettings {
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

    /// `[[routes]]`, in order.
    fn routes(
        &self,
        raw: &[RawRoute],
        meters: &[MeterSpec],
        default_meter: &MeterId,
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<Vec<RouteSpec>, ConfigError> {
        let mut routes = Vec::with_capacity(raw.len());
        let mut seen = HashSet::new();
        let mut features_seen: HashSet<String> = HashSet::new();
        for (i, r) in raw.iter().enumerate() {
            let base = format!("routes[{i}]");
            let method = match r.method.as_deref() {
                None | Some("*") => None,
                Some(m) => Some(self.method(&format!("{base}.method"), m)?),
            };
            let pattern = RoutePattern::parse(&r.path).map_err(|m| self.invalid(&format!("{base}.path"), m))?;
            let meter = match &r.meter {
                Some(m) => self.meter_ref(meters, &format!("{base}.meter"), m)?,
                None => default_meter.clone(),
            };
            let cost = match r.cost {
                None => NonZeroU32::MIN,
                Some(c) => u32::try_from(c).ok().and_then(NonZeroU32::new).ok_or_else(|| {
                    self.invalid(
                        &format!("{base}.cost"),
                        format!("must be a whole number from 1 to 4294967295, not {c}"),
                    )
                })?,
            };
            if !seen.insert((method.clone(), pattern.shape())) {
                return Err(self.loc.error(
                    Kind::Conflict,
                    &format!("{base}.path"),
                    format!("another route already matches {} {}", method.as_ref().map_or("*", |m| m.as_str()), r.path),
                ));
            }
            for plan in plans.values() {
                if plan.rate.is_some() && cost > plan.burst {
                    return Err(self.invalid(
                        &format!("{base}.cost"),
                        format!(
                            "cost {cost} is larger than the burst {} of plan `{}`: no request could ever pass",
                            plan.burst, plan.id
                        ),
                    ));
                }
            }
            let mut reports: Vec<MeterId> = Vec::with_capacity(r.reports.len());
            for (j, name) in r.reports.iter().enumerate() {
                let path = format!("{base}.reports[{j}]");
                let id = self.meter_ref(meters, &path, name)?;
                if id == meter {
                    return Err(self.invalid(
                        &path,
                        format!(
                            "`{id}` is the meter this route charges: list only the other meters its handler reports"
                        ),
                    ));
                }
                if reports.contains(&id) {
                    return Err(self.invalid(&path, format!("`{id}` is listed twice")));
                }
                reports.push(id);
            }
            let feature = match &r.feature {
                None => None,
                Some(f) => {
                    check_name(self, &format!("{base}.feature"), f)?;
                    if !features_seen.contains(f) {
                        if features_seen.len() == 64 {
                            return Err(self.invalid(
                                &format!("{base}.feature"),
                                "routes may require at most 64 distinct features",
                            ));
                        }
                        features_seen.insert(f.clone());
                    }
                    Some(f.clone())
                }
            };
            routes.push(RouteSpec { method, pattern, meter, cost, reports, feature });
        }
        Ok(routes)
    }

    /// A hard quota on a meter that no request is charged (the default meter, a route's
    /// `meter`) and no route `reports` could never reject anything: usage recorded by a
    /// handler would pass the limit unchecked. Soft quotas only count overage, so they may be
    /// on any meter.
    fn hard_quotas_are_reachable(
        &self,
        plans: &BTreeMap<PlanId, PlanSpec>,
        routes: &[RouteSpec],
        default_meter: &MeterId,
        events: &EventSettings,
    ) -> Result<(), ConfigError> {
        let enforced = |m: &MeterId| {
            m == default_meter
                || routes.iter().any(|r| &r.meter == m || r.reports.contains(m))
                || events.products.values().any(|e| e == m)
        };
        for plan in plans.values() {
            for (meter, quota) in &plan.quotas {
                if quota.mode == QuotaMode::Hard && !enforced(meter) {
                    return Err(self.invalid(
                        &format!("plans.{}.quotas.{meter}", plan.id),
                        format!(
                            "a hard quota on `{meter}`, but no route charges it (`meter`) or reports it \
                             (`reports = [\"{meter}\"]`), so nothing would ever be rejected: list it in the \
                             `reports` of the routes whose handler records it{}",
                            if quota.period == Period::Prepaid { "" } else { ", or make the quota soft" }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[tenants]`.
    fn tenants(
        &self,
        raw: &BTreeMap<String, RawTenant>,
        plans: &BTreeMap<PlanId, PlanSpec>,
        meters: &[MeterSpec],
        routes: &[RouteSpec],
        default_meter: &MeterId,
        events: &EventSettings,
    ) -> Result<Vec<TenantSpec>, ConfigError> {
        let mut tenants = Vec::with_capacity(raw.len());
        let mut keys_seen = HashSet::new();
        let mut customers: HashMap<&str, &str> = HashMap::new();
        let mut metronome_customers: HashMap<&str, &str> = HashMap::new();
        for (name, t) in raw {
            let base = format!("tenants.{name}");
            let id = TenantId::parse(name).map_err(|e| self.invalid(&base, e.to_string()))?;
            let plan = self.plan_ref(plans, &format!("{base}.plan"), &t.plan)?;
            if let Some(c) = t.stripe_customer.as_deref() {
                let path = format!("{base}.stripe_customer");
                if c.is_empty() || c.len() > 255 || !c.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is not a Stripe customer id (leave the key out for a tenant without one)"),
                    ));
                }
                if let Some(other) = customers.insert(c, name) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is also tenants.{other}'s: a billing customer belongs to one tenant"),
                    ));
                }
            }
            if let Some(c) = t.metronome_customer.as_deref() {
                let path = format!("{base}.metronome_customer");
                if c.trim() != c || c.is_empty() || c.len() > 255 || c.chars().any(char::is_control) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is not a Metronome customer id or ingest alias (leave the key out for a tenant without one)"),
                    ));
                }
                if let Some(other) = metronome_customers.insert(c, name) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is also tenants.{other}'s: a billing customer belongs to one tenant"),
                    ));
                }
            }
            let mut key_hashes = Vec::new();
            for (i, key) in t.keys.iter().enumerate() {
                if let Err(m) = crate::base::check_api_key(key.as_bytes()) {
                    return Err(self.invalid(&format!("{base}.keys[{i}]"), m));
                }
                key_hashes.push(KeyHash::of(key.as_bytes()));
            }
            for (i, hex) in t.key_sha256.iter().enumerate() {
                let hash = KeyHash::from_hex(hex).ok_or_else(|| {
                    self.invalid(
                        &format!("{base}.key_sha256[{i}]"),
                        "expected 64 hexadecimal digits (a SHA-256 digest)",
                    )
                })?;
                key_hashes.push(hash);
            }
            for (i, hash) in key_hashes.iter().enumerate() {
                if !keys_seen.insert(*hash) {
                    return Err(self.loc.error(
                        Kind::Conflict,
                        &format!("{base}.keys[{i}]"),
                        "this key is already given to a tenant",
                    ));
                }
            }
            let overrides = match &t.overrides {
                None => None,
                Some(o) => {
                    let o = self.plan_override(&format!("{base}.overrides"), o, meters)?;
                    let merged = plans[&plan].with_override(&o);
                    if o.burst.is_some() && merged.rate.is_none() {
                        return Err(self.invalid(&format!("{base}.overrides.burst"), "a burst needs a rate"));
                    }
                    let mut one = BTreeMap::new();
                    one.insert(merged.id.clone(), merged.clone());
                    // The merged plan must hold as a plan does: every route's cost within its
                    // burst, its hard quotas enforced by some route or event.
                    for (i, r) in routes.iter().enumerate() {
                        if merged.rate.is_some() && r.cost > merged.burst {
                            return Err(self.invalid(
                                &format!("{base}.overrides"),
                                format!(
                                    "routes[{i}] costs {} and the overridden burst is {}: no request could ever pass",
                                    r.cost, merged.burst
                                ),
                            ));
                        }
                    }
                    self.hard_quotas_are_reachable(&one, routes, default_meter, events)
                        .map_err(|e| self.invalid(&format!("{base}.overrides.quotas"), e.message().to_owned()))?;
                    (!o.is_empty()).then_some(o)
                }
            };
            tenants.push(TenantSpec {
                id,
                plan,
                key_hashes,
                stripe_customer: t.stripe_customer.clone(),
                metronome_customer: t.metronome_customer.clone(),
                overrides,
            });
        }
        Ok(tenants)
    }

    fn plan(&self, name: &str, p: &RawPlan, meters: &[MeterSpec]) -> Result<PlanSpec, ConfigError> {
        let base = format!("plans.{name}");
        let rate = match &p.rate {
            None => None,
            Some(r) => Some(
                r.parse::<Rate>().map_err(|e| self.invalid(&format!("{base}.rate"), format!("{e}, not \"{r}\"")))?,
            ),
        };
        let burst = match (p.burst, rate) {
            (Some(b), _) => {
                let b = u32::try_from(b).ok().and_then(NonZeroU32::new);
                b.ok_or_else(|| self.invalid(&format!("{base}.burst"), "must be a whole number from 1 to 4294967295"))?
            }
            (None, Some(rate)) => rate.count(),
            (None, None) => NonZeroU32::MAX,
        };
        if p.burst.is_some() && rate.is_none() {
            return Err(self.invalid(&format!("{base}.burst"), "a burst needs a rate"));
        }
        let on_store_error = match &p.on_store_error {
            Some(v) => Some(self.policy(&format!("{base}.on_store_error"), v)?),
            None => None,
        };
        let mut quotas = BTreeMap::new();
        for (meter, q) in &p.quotas {
            let qbase = format!("{base}.quotas.{meter}");
            let id = self.meter_ref(meters, &qbase, meter)?;
            quotas.insert(id, self.quota(&qbase, q)?);
        }
        let features = self.features(&format!("{base}.features"), &p.features)?;
        Ok(PlanSpec {
            id: name.into(),
            rate,
            burst,
            on_store_error,
            quotas,
            features,
            shadow: p.shadow.unwrap_or(false),
            billed: p.billed.unwrap_or(false),
            concurrency: match p.concurrency {
                None => None,
                Some(n) => Some(
                    u32::try_from(n).ok().filter(|n| *n <= 1_000_000).and_then(NonZeroU32::new).ok_or_else(|| {
                        self.invalid(
                            &format!("{base}.concurrency"),
                            format!("a number of requests from 1 to 1000000, not {n}"),
                        )
                    })?,
                ),
            },
        })
    }

    /// A list of feature names: each a name (letters, digits, `-`, `_`, `.`), none twice.
    fn features(&self, path: &str, raw: &[String]) -> Result<std::collections::BTreeSet<String>, ConfigError> {
        let mut features = std::collections::BTreeSet::new();
        for (i, f) in raw.iter().enumerate() {
            let at = format!("{path}[{i}]");
            check_name(self, &at, f)?;
            if !features.insert(f.clone()) {
                return Err(self.invalid(&at, format!("`{f}` is listed twice")));
            }
        }
        Ok(features)
    }

    /// A tenant's overrides of its plan (`[tenants.X.overrides]`, or their JSON form).
    fn plan_override(&self, base: &str, o: &RawOverride, meters: &[MeterSpec]) -> Result<PlanOverride, ConfigError> {
        let rate = match &o.rate {
            None => None,
            Some(r) => Some(
                r.parse::<Rate>().map_err(|e| self.invalid(&format!("{base}.rate"), format!("{e}, not \"{r}\"")))?,
            ),
        };
        let burst = match o.burst {
            None => None,
            Some(b) => Some(u32::try_from(b).ok().and_then(NonZeroU32::new).ok_or_else(|| {
                self.invalid(&format!("{base}.burst"), "must be a whole number from 1 to 4294967295")
            })?),
        };
        let mut quotas = BTreeMap::new();
        for (meter, q) in &o.quotas {
            let qbase = format!("{base}.quotas.{meter}");
            let id = self.meter_ref(meters, &qbase, meter)?;
            quotas.insert(id, self.quota(&qbase, q)?);
        }
        let features = self.features(&format!("{base}.features"), &o.features)?;
        Ok(PlanOverride { rate, burst, quotas, features })
    }

    fn quota(&self, base: &str, q: &RawQuota) -> Result<QuotaSpec, ConfigError> {
        let period = match q.period.as_str() {
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
                    format!("expected \"day\", \"month\" or \"prepaid\", not \"{other}\""),
                ))
            }
        };
        let limit = match (period, q.limit) {
            (Period::Prepaid, _) => NonZeroU64::new(crate::base::MAX_BALANCE).unwrap_or(NonZeroU64::MAX),
            (_, Some(limit)) => self.positive(&format!("{base}.limit"), limit)?,
            (_, None) => {
                return Err(
                    self.invalid(&format!("{base}.limit"), "a day or month quota needs a limit (units per period)")
                )
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
        Ok(QuotaSpec { limit, period, mode, lease })
    }
}

/// The tenant that unknown callers are served as, with `identify.unknown = "anonymous"`.
pub(crate) const ANONYMOUS_TENANT: &str = "anonymous";

fn check_name(v: &Validator<'_, '_>, path: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(v.invalid(path, "names are 1 to 64 characters among letters, digits, '-', '_' and '.'"))
    }
}

/// The gRPC status codes by name, in code order (0 to 16).
const GRPC_CODES: [&str; 17] = [
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
fn grpc_code(text: &str) -> Option<u8> {
    let text = text.trim();
    match text.parse::<u8>() {
        Ok(n) if n <= 16 => Some(n),
        Ok(_) => None,
        Err(_) => GRPC_CODES.iter().position(|n| n.eq_ignore_ascii_case(text)).map(|n| n as u8),
    }
}

/// The HTTP status a gRPC status code stands for (the mapping of google.rpc.Code).
fn grpc_http_equivalent(code: u8) -> u16 {
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

/// Whether `url` is the scheme and the host (with a port) only: the clients append `v1/…` to
/// it, so a path (`…/v1`) makes every call a 404.
fn host_only(url: &str) -> bool {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| {
        let host = r.strip_suffix('/').unwrap_or(r);
        !host.is_empty() && !host.contains(['/', '?', '#', ' '])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        parse(text).unwrap_err()
    }

    #[test]
    fn a_tenant_named_like_the_anonymous_tenant_is_refused() {
        let e = err("[identify]\nunknown = \"anonymous\"\nanonymous_plan = \"p\"\n[plans.p]\n[tenants.anonymous]\nplan = \"p\"\n");
        assert_eq!((e.kind(), e.key(), e.line()), (Kind::Conflict, "tenants.anonymous", Some(5)));
        assert!(parse("[plans.p]\n[tenants.anonymous]\nplan = \"p\"\n").is_ok(), "fine without an anonymous plan");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = err("[plans.free]\nrate = \"1/s\"\nrat = 3\n");
        assert_eq!(e.kind(), Kind::UnknownKey);
        assert_eq!(e.key(), "plans.free.rat");
        assert_eq!(e.line(), Some(3));
        let e = err("[usage]\nflush = \"1s\"\n");
        assert_eq!(e.key(), "usage.flush");
        assert_eq!((e.line(), e.column()), (Some(2), Some(1)));
    }

    #[test]
    fn impossible_values_are_rejected_where_they_stand() {
        let e = err("[plans.free]\nrate = \"10/s\"\nburst = 2\n[[routes]]\npath = \"/x\"\ncost = 5\n");
        assert_eq!(e.key(), "routes[0].cost");
        assert_eq!(e.line(), Some(6));
        let e = err("[tenants.a]\nplan = \"gold\"\n");
        assert_eq!(e.kind(), Kind::UnknownReference);
        assert_eq!((e.key(), e.line()), ("tenants.a.plan", Some(2)));
        let e = err("[[routes]]\npath = \"/a/{id}\"\n[[routes]]\npath = \"/a/{other}\"\n");
        assert_eq!(e.kind(), Kind::Conflict);
        assert_eq!((e.key(), e.line()), ("routes[1].path", Some(4)));
        let e = err("[plans.p.quotas.requests]\nlimit = 0\nperiod = \"day\"\n");
        assert_eq!((e.key(), e.line()), ("plans.p.quotas.requests.limit", Some(2)));
        let e = err("[plans.p]\nquotas.widgets = { limit = 5, period = \"day\" }\n");
        assert_eq!(e.key(), "plans.p.quotas.widgets");
        assert_eq!(e.line(), Some(2));
    }

    #[test]
    fn type_errors_and_syntax_errors_have_positions() {
        let e = err("[plans.free]\nburst = \"many\"\n");
        assert_eq!(e.key(), "plans.free.burst");
        assert_eq!(e.line(), Some(2));
        let e = err("[plans.free\nrate = 1\n");
        assert_eq!(e.kind(), Kind::Syntax);
        assert_eq!(e.line(), Some(1));
    }

    /// The key path and line of the error `text` gives.
    fn at(text: &str) -> (String, Option<usize>) {
        let e = err(text);
        (e.key().to_owned(), e.line())
    }

    #[test]
    fn tenant_names_follow_the_tenant_id_grammar() {
        let ok = parse("[plans.p]\n[tenants.\"sub|1234\"]\nplan = \"p\"\n").unwrap();
        assert_eq!(ok.tenants()[0].id().as_str(), "sub|1234");
        let e = err("[plans.p]\n[tenants.\"a b\"]\nplan = \"p\"\n");
        assert_eq!(e.kind(), Kind::InvalidValue);
        assert_eq!((e.key(), e.line(), e.column()), ("tenants.a b", Some(2), Some(1)));
        let long = "x".repeat(129);
        let e = err(&format!("[plans.p]\n\n[tenants.{long}]\nplan = \"p\"\n"));
        assert_eq!((e.key(), e.line()), (format!("tenants.{long}").as_str(), Some(3)));
        assert!(parse(&format!("[plans.p]\n[tenants.{}]\nplan = \"p\"\n", "x".repeat(128))).is_ok());
        // Plans and meters keep the stricter name grammar.
        assert_eq!(at("[plans.\"a|b\"]\n"), ("plans.a|b".to_owned(), Some(1)));
    }

    #[test]
    fn an_empty_event_name_is_rejected() {
        assert_eq!(at("[meters.tokens]\nevent_name = \"\"\n"), ("meters.tokens.event_name".to_owned(), Some(2)));
    }

    #[test]
    fn grace_stays_within_the_billing_horizon() {
        assert_eq!(at("[usage]\ngrace = \"36days\"\n"), ("usage.grace".to_owned(), Some(2)));
        assert_eq!(at("[usage]\ngrace = \"35days 1s\"\n"), ("usage.grace".to_owned(), Some(2)));
        assert_eq!(parse("[usage]\ngrace = \"35days\"\n").unwrap().usage().grace, Duration::from_secs(35 * 86_400));
    }

    #[test]
    fn stored_responses_fit_their_store() {
        // A window's half of the store must hold one response of the longest body, with 8 KiB
        // of headers.
        assert_eq!(
            at("[limits]\nidempotency_max_body = 1000\nidempotency_store_bytes = 18383\n"),
            ("limits.idempotency_store_bytes".to_owned(), Some(3))
        );
        assert!(parse("[limits]\nidempotency_max_body = 1000\nidempotency_store_bytes = 18384\n").is_ok());
        assert_eq!(
            at("[limits]\nidempotency_store_bytes = 0\n"),
            ("limits.idempotency_store_bytes".to_owned(), Some(2))
        );
        assert_eq!(
            at("[limits]\nidempotency_buffer_bytes = 0\n"),
            ("limits.idempotency_buffer_bytes".to_owned(), Some(2))
        );
        // DynamoDB: an item holds 400 KB; the window's half is split in 16 counters.
        let dynamo = "[store]\nkind = \"dynamodb\"\ntable = \"t\"\n";
        assert_eq!(
            at(&format!("{dynamo}[limits]\nidempotency_max_body = 350001\nidempotency_store_bytes = 100000000\n")),
            ("limits.idempotency_max_body".to_owned(), Some(5))
        );
        assert_eq!(
            at(&format!("{dynamo}[limits]\nidempotency_max_body = 1000\nidempotency_store_bytes = 294143\n")),
            ("limits.idempotency_store_bytes".to_owned(), Some(6))
        );
        assert!(parse(&format!("{dynamo}[limits]\nidempotency_max_body = 350000\n")).is_ok());
    }

    #[test]
    fn an_empty_billable_list_is_rejected() {
        let e = err("[usage]\nbillable = []\n");
        assert_eq!((e.kind(), e.key(), e.line()), (Kind::InvalidValue, "usage.billable", Some(2)));
    }

    #[test]
    fn only_standard_methods_are_accepted() {
        assert_eq!(at("[[routes]]\nmethod = \"GETT\"\npath = \"/x\"\n"), ("routes[0].method".to_owned(), Some(2)));
        assert_eq!(
            at("[limits]\nidempotency_methods = [\"POST\", \"GETT\"]\n"),
            ("limits.idempotency_methods[1]".to_owned(), Some(2))
        );
        assert_eq!(
            at("[limits]\nidempotency_methods = [\"*\"]\n"),
            ("limits.idempotency_methods[0]".to_owned(), Some(2))
        );
        let c = parse("[[routes]]\nmethod = \"patch\"\npath = \"/a\"\n[[routes]]\nmethod = \"*\"\npath = \"/b\"\n")
            .unwrap();
        assert_eq!(c.routes()[0].method(), Some(&http::Method::PATCH));
        assert_eq!(c.routes()[1].method(), None);
        for m in ["get", "HEAD", "Post", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"] {
            assert!(parse(&format!("[limits]\nidempotency_methods = [\"{m}\"]\n")).is_ok(), "{m}");
        }
    }

    #[test]
    fn route_paths_without_empty_segments_or_repeated_parameters() {
        for path in ["/a//b", "/a/", "//", "/a/{id}/b/{id}", "/a/{id}/{*id}"] {
            let text = format!("[[routes]]\nmethod = \"GET\"\npath = \"{path}\"\n");
            assert_eq!(at(&text), ("routes[0].path".to_owned(), Some(3)), "{path}");
        }
        assert!(parse("[[routes]]\npath = \"/\"\n[[routes]]\npath = \"/a/{id}/b/{other}\"\n").is_ok());
    }

    #[test]
    fn rates_with_stray_spaces_or_underscores_are_rejected() {
        for rate in ["2 / s", "_2/s", " 2/s", "2/s ", "2_/s", "6__000/min"] {
            let text = format!("[plans.a]\nrate = \"{rate}\"\n");
            assert_eq!(at(&text), ("plans.a.rate".to_owned(), Some(2)), "{rate}");
        }
        let c = parse("[plans.a]\nrate = \"6_000/min\"\n[plans.b]\nrate = \"2/s\"\n").unwrap();
        assert_eq!(c.plan(&"a".into()).unwrap().rate().unwrap().count().get(), 6000);
    }

    #[test]
    fn duplicate_keys_are_named() {
        let e = err("[plans.a]\nrate=\"1/s\"\nrate=\"2/s\"\n");
        assert_eq!((e.key(), e.line(), e.column()), ("plans.a.rate", Some(3), Some(1)));
        assert!(e.message().contains("duplicate key"), "{e}");
        assert_eq!(at("[plans.a]\n[plans.b]\n[plans.a]\n"), ("plans.a".to_owned(), Some(3)));
        assert_eq!(
            at("[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\npath = \"/c\"\n"),
            ("routes[1].path".to_owned(), Some(5))
        );
        assert_eq!(
            at("[plans.a]\nquotas.x.limit = 1\nquotas.y.limit = 2\nquotas.x.limit = 3\n"),
            ("plans.a.quotas.x.limit".to_owned(), Some(4))
        );
        assert_eq!(
            at("[plans.a]\nquotas.requests = { limit = 1, period = \"day\", limit = 2 }\n"),
            ("plans.a.quotas.requests.limit".to_owned(), Some(2))
        );
        assert_eq!(at("[tenants.\"a b\"]\nplan = \"p\"\n\"plan\" = \"q\"\n"), ("tenants.a b.plan".to_owned(), Some(3)));
    }

    #[test]
    fn an_empty_document_is_rejected() {
        for text in ["", "\n  \n", "# nothing yet\n\n# still nothing\n"] {
            let e = err(text);
            assert_eq!(e.kind(), Kind::InvalidValue);
            assert_eq!((e.key(), e.line(), e.column()), ("", Some(1), Some(1)));
            assert!(e.message().contains("no plans"), "{e}");
        }
        // Any key at all makes a document: a configuration without plans stays valid.
        assert!(parse("[limits]\n").is_ok());
        assert!(parse("[limits]\nmax_tenants = 5\n").unwrap().plans().is_empty());
    }

    #[test]
    fn new_settings_have_defaults() {
        let c = parse("[limits]\n").unwrap();
        assert_eq!(c.usage().shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.limits().directory_ttl, Duration::from_secs(60));
        assert_eq!(c.limits().negative_ttl, Duration::from_secs(10));
        assert_eq!(c.limits().negative_capacity, 100_000);
        let c = parse(
            "[limits]\ndirectory_ttl = \"5m\"\nnegative_ttl = \"1s\"\nnegative_capacity = 7\n\
             [usage]\nshutdown_timeout = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(c.usage().shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.limits().directory_ttl, Duration::from_secs(300));
        assert_eq!(c.limits().negative_ttl, Duration::from_secs(1));
        assert_eq!(c.limits().negative_capacity, 7);
    }

    #[test]
    fn new_settings_reject_bad_values() {
        assert_eq!(at("[usage]\nshutdown_timeout = \"soon\"\n"), ("usage.shutdown_timeout".to_owned(), Some(2)));
        assert_eq!(at("[limits]\n\ndirectory_ttl = \"0s\"\n"), ("limits.directory_ttl".to_owned(), Some(3)));
        assert_eq!(at("[limits]\nnegative_ttl = \"10\"\n"), ("limits.negative_ttl".to_owned(), Some(2)));
        let e = err("[limits]\nnegative_capacity = 0\n");
        assert_eq!((e.kind(), e.key(), e.line()), (Kind::InvalidValue, "limits.negative_capacity", Some(2)));
        assert_eq!(at("[limits]\nnegative_capacity = -3\n"), ("limits.negative_capacity".to_owned(), Some(2)));
    }

    const TOKENS: &str = "[meters.tokens]\n[meters.images]\n";

    #[test]
    fn routes_declare_the_meters_their_handler_reports() {
        let c = parse(&format!("{TOKENS}[[routes]]\npath = \"/g\"\nreports = [\"tokens\", \"images\"]\n")).unwrap();
        assert_eq!(c.routes()[0].reports(), [MeterId::from("tokens"), MeterId::from("images")]);
        let c = parse(&format!("{TOKENS}[[routes]]\npath = \"/g\"\n")).unwrap();
        assert!(c.routes()[0].reports().is_empty());

        let e = err(&format!("{TOKENS}[[routes]]\npath = \"/g\"\n\nreports = [\"tokens\", \"widgets\"]\n"));
        assert_eq!(e.kind(), Kind::UnknownReference);
        assert_eq!((e.key(), e.line()), ("routes[0].reports[1]", Some(6)));
        let e = err(&format!("{TOKENS}[[routes]]\npath = \"/g\"\nreports = [\"tokens\", \"tokens\"]\n"));
        assert_eq!((e.key(), e.line()), ("routes[0].reports[1]", Some(5)));
        let e = err(&format!(
            "{TOKENS}[[routes]]\npath = \"/g\"\nmeter = \"tokens\"\nreports = [\"images\", \"tokens\"]\n"
        ));
        assert_eq!((e.key(), e.line()), ("routes[0].reports[1]", Some(6)));
        // A route without a meter charges the default meter: it cannot report it too.
        let e = err("[[routes]]\npath = \"/g\"\nreports = [\"requests\"]\n");
        assert_eq!((e.key(), e.line()), ("routes[0].reports[0]", Some(3)));
    }

    #[test]
    fn a_hard_quota_needs_a_route_that_charges_or_reports_its_meter() {
        let plan = "[plans.p]\nrate = \"1/s\"\nquotas.tokens = { limit = 5, period = \"day\" }\n";
        let e = err(&format!("{TOKENS}{plan}"));
        assert_eq!(e.kind(), Kind::InvalidValue);
        assert_eq!((e.key(), e.line()), ("plans.p.quotas.tokens", Some(5)));
        assert!(e.message().contains("reports"), "{e}");
        // Reported, charged by a route, or the default meter: each makes the quota reachable.
        assert!(parse(&format!("{TOKENS}{plan}[[routes]]\npath = \"/g\"\nreports = [\"tokens\"]\n")).is_ok());
        assert!(parse(&format!("{TOKENS}{plan}[[routes]]\npath = \"/g\"\nmeter = \"tokens\"\n")).is_ok());
        assert!(parse(&format!("{TOKENS}{plan}[usage]\ndefault_meter = \"tokens\"\n")).is_ok());
        // A soft quota only counts overage: it is allowed on any meter.
        assert!(parse(&format!(
            "{TOKENS}[plans.p]\nquotas.tokens = {{ limit = 5, period = \"day\", mode = \"soft\" }}\n"
        ))
        .is_ok());
        // `requests` is the default meter, so its quotas are always reachable...
        assert!(parse("[plans.p]\nquotas.requests = { limit = 5, period = \"day\" }\n").is_ok());
        // ...unless another meter is the default and no route charges `requests`.
        let e = err(&format!(
            "{TOKENS}[usage]\ndefault_meter = \"tokens\"\n[plans.p]\nquotas.requests = {{ limit = 5, period = \"day\" }}\n"
        ));
        assert_eq!((e.key(), e.line()), ("plans.p.quotas.requests", Some(6)));
    }

    #[test]
    fn paths_split_with_indices() {
        let segs: Vec<String> = split_path("routes[3].cost")
            .map(|s| match s {
                Segment::Key(k) => k.to_owned(),
                Segment::Index(i) => i.to_string(),
            })
            .collect();
        assert_eq!(segs, ["routes", "3", "cost"]);
    }
}
