//! `[alerts]`: where threshold crossings are sent as signed webhooks (Standard Webhooks), and
//! how their delivery is retried.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::validator::{check_name, Validator};
use super::ConfigError;
use crate::base::WebhookSecret;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlerts {
    pub(crate) timeout: Option<String>,
    pub(crate) retry_for: Option<String>,
    pub(crate) claim: Option<String>,
    pub(crate) allow_private: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) endpoints: BTreeMap<String, RawEndpoint>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEndpoint {
    pub(crate) url: Option<String>,
    pub(crate) secret_env: Option<String>,
    pub(crate) secret_file: Option<String>,
    pub(crate) events: Option<Vec<String>>,
}

/// The event types of alerts (the `type` of their JSON body), each with a documented,
/// versioned schema (the [alerts guide](crate::guide::alerts)).
pub const EVENT_TYPES: [&str; 11] = [
    "quota.threshold_crossed",
    "quota.exhausted",
    "balance.low",
    "balance.exhausted",
    "balance.recharged",
    "balance.recharge_failed",
    "balance.recharge_limit_reached",
    "balance.recharge_action_required",
    "spend.threshold_crossed",
    "spend.cap_reached",
    "tenant.tier_changed",
];

/// `[alerts]`: the operator's endpoints for alerts, and how deliveries are made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlertSettings {
    /// How long one delivery may take, its answer read (`timeout`, 10 s by default).
    pub timeout: Duration,
    /// How long an alert is retried, from when it was written, before it becomes a dead letter
    /// (`retry_for`, 3 days by default).
    pub retry_for: Duration,
    /// How long a node's claim on an alert holds (`claim`, 60 s by default; at least twice
    /// `timeout`): another node delivers it after that if the first died mid-delivery.
    pub claim: Duration,
    /// Address ranges a tenant's own endpoint may reach although they are not public
    /// (`allow_private`, none by default): a tenant's endpoint is refused, at registration and
    /// at every connection, when it resolves to a loopback, private or link-local address
    /// outside these (the SSRF guard). With a loopback range here, a tenant's endpoint may use
    /// plain `http` to it.
    pub allow_private: Vec<crate::config::IpRange>,
    /// The operator's endpoints (`[alerts.endpoints.NAME]`).
    pub endpoints: Vec<AlertEndpoint>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(3 * 86_400),
            claim: Duration::from_secs(60),
            allow_private: Vec::new(),
            endpoints: Vec::new(),
        }
    }
}

impl AlertSettings {
    /// The endpoint named `name`.
    #[must_use]
    pub fn endpoint(&self, name: &str) -> Option<&AlertEndpoint> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// Whether a tenant's endpoint may reach `ip`: a public address, or one of
    /// `allow_private`.
    #[must_use]
    pub fn tenant_may_reach(&self, ip: std::net::IpAddr) -> bool {
        crate::base::is_public(ip) || self.allow_private.iter().any(|r| r.contains(ip))
    }

    /// Checks the URL of a tenant's endpoint, without resolving it: `https`, or plain `http`
    /// to a loopback address `allow_private` allows; an address written in it must be one a
    /// tenant may reach. Its host and port.
    ///
    /// # Errors
    /// Why the URL is refused.
    pub fn tenant_url(&self, url: &str) -> Result<(String, u16), String> {
        if url.len() > 2_048 {
            return Err("a URL of at most 2048 characters".to_owned());
        }
        let (https, host, port) = endpoint_url(url).map_err(|why| format!("expected {why}"))?;
        let literal: Option<std::net::IpAddr> = host.parse().ok();
        // A name is checked on the addresses it resolves to, at registration and at every
        // connection.
        if let Some(ip) = literal {
            if !self.tenant_may_reach(ip) {
                return Err(format!("{ip} is not a public address"));
            }
        }
        if !https && !literal.is_some_and(crate::base::is_loopback) {
            return Err("an https URL".to_owned());
        }
        Ok((host, port))
    }
}

/// An operator's endpoint for alerts (`[alerts.endpoints.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlertEndpoint {
    /// Its name in the file.
    pub name: String,
    /// Where alerts are posted (`url`): `https`, or `http` on loopback only.
    pub url: String,
    /// The secrets each delivery is signed with (from `secret_env` or `secret_file`, never the
    /// file itself): one signature per secret, several while one is rotated.
    pub secrets: Vec<WebhookSecret>,
    /// The event types it receives (`events`: names, or `quota.*` for a family; all by
    /// default).
    pub events: Vec<String>,
}

impl AlertEndpoint {
    /// Whether it receives alerts of type `event`.
    #[must_use]
    pub fn wants(&self, event: &str) -> bool {
        self.events.is_empty()
            || self
                .events
                .iter()
                .any(|e| e == event || e == "*" || e.strip_suffix('*').is_some_and(|family| event.starts_with(family)))
    }
}

/// What an alert endpoint's URL is, checked: `(https, host, port)`.
pub(crate) fn endpoint_url(url: &str) -> Result<(bool, String, u16), &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "not a URL")?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("a URL of http:// or https://"),
    };
    let authority = uri.authority().ok_or("a URL with a host")?;
    if authority.as_str().contains('@') {
        return Err("a URL without user information");
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    if host.is_empty() {
        return Err("a URL with a host");
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok((https, host, port))
}

/// Whether `host` names this host: `localhost`, or a loopback address.
pub(crate) fn loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse().is_ok_and(crate::base::is_loopback)
}

impl Validator<'_, '_> {
    /// `[alerts]`: each endpoint a URL (`http` only on loopback), its secrets read from the
    /// environment or a file (never the configuration file), its events known.
    pub(super) fn alerts(&self, raw: &RawAlerts) -> Result<AlertSettings, ConfigError> {
        let d = AlertSettings::default();
        let timeout = self.duration("alerts.timeout", raw.timeout.as_deref(), d.timeout)?;
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(60) {
            return Err(self.invalid("alerts.timeout", "must be from 1s to 60s"));
        }
        let retry_for = self.duration("alerts.retry_for", raw.retry_for.as_deref(), d.retry_for)?;
        if retry_for < Duration::from_secs(60) || retry_for > d.retry_for {
            return Err(self.invalid("alerts.retry_for", "must be from 1m to 3 days"));
        }
        // A claim covers its delivery, the settle after it (and the second it may lose, being
        // counted in whole seconds).
        let least = (timeout * 2).max(timeout + Duration::from_secs(5));
        let claim = self.duration("alerts.claim", raw.claim.as_deref(), d.claim.max(least))?;
        if claim < least || claim > Duration::from_secs(3_600) {
            return Err(self.invalid(
                "alerts.claim",
                format!(
                    "must be at least twice alerts.timeout and alerts.timeout + 5s ({}s here: a claim outlasts the \
                     delivery it covers and its settle) and at most 1h",
                    least.as_secs()
                ),
            ));
        }
        let mut allow_private = Vec::new();
        for (i, r) in raw.allow_private.iter().flatten().enumerate() {
            allow_private.push(
                crate::config::IpRange::parse(r).map_err(|e| self.invalid(&format!("alerts.allow_private[{i}]"), e))?,
            );
        }
        if !raw.endpoints.is_empty() && !cfg!(feature = "alerts") {
            return Err(self.invalid(
                "alerts.endpoints",
                "delivering alerts needs the cargo feature `alerts` (tollgate = { features = [\"alerts\"] })",
            ));
        }
        let mut endpoints = Vec::new();
        for (name, e) in &raw.endpoints {
            let at = format!("alerts.endpoints.{name}");
            check_name(self, &at, name)?;
            let Some(url) = &e.url else { return Err(self.invalid(&format!("{at}.url"), "an endpoint needs a url")) };
            let (https, host, _) =
                endpoint_url(url).map_err(|why| self.invalid(&format!("{at}.url"), format!("expected {why}")))?;
            if !https && !loopback_host(&host) {
                return Err(self.invalid(
                    &format!("{at}.url"),
                    "plain http only to this host (localhost, 127.0.0.1, ::1): use https elsewhere",
                ));
            }
            let (key, text) = match (&e.secret_env, &e.secret_file) {
                (Some(_), Some(_)) => {
                    return Err(self.invalid(&format!("{at}.secret_file"), "either secret_env or secret_file, not both"))
                }
                (None, None) => {
                    return Err(self.invalid(
                        &at,
                        "an endpoint needs its signing secret: secret_env (an environment variable) or secret_file \
                         (never the secret itself in this file)",
                    ))
                }
                (Some(var), None) => (
                    format!("{at}.secret_env"),
                    std::env::var(var).map_err(|_| {
                        self.invalid(&format!("{at}.secret_env"), format!("the environment variable {var} is not set"))
                    })?,
                ),
                (None, Some(path)) => (
                    format!("{at}.secret_file"),
                    std::fs::read_to_string(path)
                        .map_err(|e| self.invalid(&format!("{at}.secret_file"), format!("cannot read {path}: {e}")))?,
                ),
            };
            let secrets = WebhookSecret::parse_list(&text).map_err(|e| self.invalid(&key, e.to_string()))?;
            let events = e.events.clone().unwrap_or_default();
            for (i, ev) in events.iter().enumerate() {
                let family = ev.strip_suffix('*');
                let known = ev == "*"
                    || EVENT_TYPES.contains(&ev.as_str())
                    || family.is_some_and(|f| f.ends_with('.') && EVENT_TYPES.iter().any(|t| t.starts_with(f)));
                if !known {
                    return Err(self.invalid(
                        &format!("{at}.events[{i}]"),
                        format!(
                            "unknown event type `{ev}`: one of {}, or a family such as `quota.*`",
                            EVENT_TYPES.join(", ")
                        ),
                    ));
                }
            }
            endpoints.push(AlertEndpoint { name: name.clone(), url: url.clone(), secrets, events });
        }
        Ok(AlertSettings { timeout, retry_for, claim, allow_private, endpoints })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "alerts")]
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// The error of `text` read as a file: its key, line, and that it names the file.
    #[cfg(feature = "alerts")]
    fn refused(text: &str) -> (String, Option<usize>, String) {
        let dir = std::env::temp_dir().join(format!("tollgate-alerts-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("t{}.toml", crate::base::draw_u64()));
        std::fs::write(&file, text).unwrap();
        let e = crate::Config::from_path(&file).unwrap_err();
        assert_eq!(e.file(), Some(file.as_path()), "{e}");
        assert!(e.to_string().contains(&*file.to_string_lossy()), "{e}");
        (e.key().to_owned(), e.line(), e.to_string())
    }

    #[cfg(feature = "alerts")]
    #[test]
    fn bad_endpoints_are_refused_at_load_naming_file_line_and_key() {
        let dir = std::env::temp_dir().join(format!("tollgate-alerts-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, format!("{SECRET}\n")).unwrap();
        let bad = dir.join("bad");
        std::fs::write(&bad, "not-a-secret\n").unwrap();
        let endpoint = |url: &str, secret: &str| {
            format!("[plans.p]\nrate = \"1/s\"\n[alerts]\n[alerts.endpoints.ops]\nurl = \"{url}\"\n{secret}\n")
        };
        let file = |p: &std::path::Path| format!("secret_file = \"{}\"", p.display());
        let (key, line, _) = refused(&endpoint("not a url", &file(&good)));
        assert_eq!((key.as_str(), line), ("alerts.endpoints.ops.url", Some(5)));
        let (key, _, why) = refused(&endpoint("http://hooks.example.com/x", &file(&good)));
        assert_eq!(key, "alerts.endpoints.ops.url");
        assert!(why.contains("plain http"), "{why}");
        let (key, line, why) = refused(&endpoint("https://hooks.example.com/x", &file(&bad)));
        assert_eq!((key.as_str(), line), ("alerts.endpoints.ops.secret_file", Some(6)));
        assert!(why.contains("whsec_"), "{why}");
        let (key, _, _) =
            refused(&endpoint("https://hooks.example.com/x", "secret_env = \"TOLLGATE_NO_SUCH_VARIABLE\""));
        assert_eq!(key, "alerts.endpoints.ops.secret_env");
        let (key, _, why) = refused(&endpoint("https://hooks.example.com/x", ""));
        assert_eq!(key, "alerts.endpoints.ops");
        assert!(why.contains("secret"), "{why}");
        let (key, _, _) =
            refused(&format!("{}events = [\"quota.nope\"]\n", endpoint("https://h.example.com/", &file(&good))));
        assert_eq!(key, "alerts.endpoints.ops.events[0]");
        let (key, _, _) = refused("[plans.p]\nrate = \"1/s\"\n[alerts]\ntimeout = \"30s\"\nclaim = \"40s\"\n");
        assert_eq!(key, "alerts.claim");
        let (key, _, why) = refused("[plans.p]\nrate = \"1/s\"\n[alerts]\ntimeout = \"1s\"\nclaim = \"2s\"\n");
        assert_eq!(key, "alerts.claim");
        assert!(why.contains("6s"), "{why}");
        let (key, _, _) = refused("[plans.p]\nrate = \"1/s\"\n[alerts]\nallow_private = [\"10.0.0.0/99\"]\n");
        assert_eq!(key, "alerts.allow_private[0]");
        // A secret in the file itself is an unknown key.
        let (key, _, _) = refused(&endpoint("https://hooks.example.com/x", &format!("secret = \"{SECRET}\"")));
        assert!(key.starts_with("alerts.endpoints"), "{key}");
        // Accepted: http to loopback, the secret from a file, a family of events.
        let ok = format!("{}events = [\"quota.*\"]\n", endpoint("http://127.0.0.1:9/x", &file(&good)));
        let c = crate::Config::from_toml_str(&ok).unwrap();
        let e = c.alerts().endpoint("ops").unwrap();
        assert!(e.wants("quota.exhausted") && !e.wants("balance.low"));
        assert!(!format!("{c:?}").contains(SECRET), "secrets are never shown");
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(endpoint_url("https://hooks.example.com/x"), Ok((true, "hooks.example.com".into(), 443)));
        assert_eq!(endpoint_url("http://[::1]:8080/x"), Ok((false, "::1".into(), 8080)));
        for bad in ["hooks.example.com", "ftp://x/", "https://user:pw@x.com/", "https:///x", "not a url"] {
            assert!(endpoint_url(bad).is_err(), "{bad}");
        }
        assert!(loopback_host("LOCALHOST") && loopback_host("127.0.0.2") && loopback_host("::1"));
        assert!(!loopback_host("example.com") && !loopback_host("10.0.0.1"));
    }

    /// A tenant's endpoint is `https`; plain `http` only to a loopback address the operator
    /// allowed with `allow_private` (issue 53): never to a loopback address outside it, nor
    /// to another private range it allows, nor to a public name.
    #[test]
    fn a_tenant_endpoint_is_https_or_http_only_inside_allowed_loopback() {
        let range = |r: &str| crate::config::IpRange::parse(r).unwrap();
        let none = AlertSettings::default();
        let allowed = AlertSettings {
            allow_private: vec![range("127.0.0.1/32"), range("::1/128"), range("10.0.0.0/8")],
            ..AlertSettings::default()
        };
        for url in ["http://127.0.0.1:9/x", "http://[::1]:9/x", "https://127.0.0.1/x"] {
            assert!(none.tenant_url(url).is_err(), "{url}: no private range allowed");
            assert!(allowed.tenant_url(url).is_ok(), "{url}: allowed");
        }
        assert!(allowed.tenant_url("http://127.0.0.2:9/x").is_err(), "loopback outside the range");
        assert_eq!(allowed.tenant_url("http://10.1.2.3/x").unwrap_err(), "an https URL");
        assert!(allowed.tenant_url("https://10.1.2.3/x").is_ok());
        assert_eq!(none.tenant_url("http://hooks.example.com/x").unwrap_err(), "an https URL");
        assert!(none.tenant_url("https://hooks.example.com/x").is_ok());
    }
}
