//! Who may read the dashboard: an access token, compared in constant time, given as
//! `Authorization: Bearer` or through the login form, which sets a session cookie derived from
//! it; or nobody checked, when the application says so.

use crate::config::{Config, DashboardToken};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "tollgate_dashboard";

/// How long a session of the login form lasts (12 hours), its cookie's `Max-Age`.
pub const SESSION_SECS: i64 = 12 * 3600;

/// Who may read the dashboard.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Access {
    /// Whoever shows this token: `Authorization: Bearer <token>`, or the login form, which sets
    /// a session cookie (`HttpOnly`, `SameSite=Strict`) derived from it.
    Token(DashboardToken),
    /// Everyone who reaches the router: for an application that puts its own authentication in
    /// front of it. An explicit choice: no constructor falls back to it.
    Open,
    /// No token, for a dashboard listening on a loopback address only (`tollgate dashboard`
    /// without one): requests must name a loopback host (`localhost`, `127.0.0.1`, `[::1]`,
    /// any port) in `Host`, so that a web page whose name an attacker points at 127.0.0.1 (DNS
    /// rebinding) is answered 421 rather than read. HTTP/1.1 only: an HTTP/2 request carries
    /// its host as `:authority`, not `Host`, and is answered 421.
    Loopback,
}

/// Why [`Access::from_config`] gave no access rule.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The configuration names no token file.
    #[error(
        "the dashboard needs an access token: set dashboard.token_file, or pass Access::Open if the application \
         authenticates the dashboard's routes itself"
    )]
    NoToken,
}

impl Access {
    /// The token of the configuration's `[dashboard] token_file`.
    ///
    /// # Errors
    /// [`AccessError::NoToken`] when the configuration names none: a dashboard is never open
    /// by default.
    pub fn from_config(config: &Config) -> Result<Self, AccessError> {
        config.dashboard().token.clone().map(Access::Token).ok_or(AccessError::NoToken)
    }

    /// Whether `headers` name a host this rule answers: any but for
    /// [`Loopback`](Self::Loopback).
    pub(crate) fn answers_host(&self, headers: &http::HeaderMap) -> bool {
        if !matches!(self, Access::Loopback) {
            return true;
        }
        let Some(host) = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()) else { return false };
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether `headers` carry the token (or the rule needs none).
    pub(crate) fn allows(&self, headers: &http::HeaderMap) -> bool {
        let Access::Token(token) = self else { return true };
        let bearer = headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .any(|given| same(given.trim().as_bytes(), token.expose().as_bytes()));
        bearer || cookie_of(headers).is_some_and(|c| session_holds(token, c, now()))
    }

    /// Whether `given` (the login form's) is the token.
    pub(crate) fn accepts(&self, given: &str) -> bool {
        match self {
            Access::Token(token) => same(given.trim().as_bytes(), token.expose().as_bytes()),
            Access::Open | Access::Loopback => true,
        }
    }

    /// The session cookie's value once the login form gave the token.
    pub(crate) fn session(&self) -> Option<String> {
        match self {
            Access::Token(token) => Some(session(token, now())),
            Access::Open | Access::Loopback => None,
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The session cookie's value for a login at `issued` (Unix seconds): the time and a MAC of it
/// under the token, so the cookie is not the token itself (a cookie read from a browser cannot
/// be used as a bearer token), ends after [`SESSION_SECS`], and changes with the token.
fn session(token: &DashboardToken, issued: i64) -> String {
    let mac = crate::base::hmac_sha256(
        token.expose().as_bytes(),
        &[b"tollgate dashboard session v2 ", issued.to_string().as_bytes()],
    );
    format!("{issued}.{}", hex::encode(mac))
}

/// Whether `cookie` is a session of `token` still in force at `now`.
fn session_holds(token: &DashboardToken, cookie: &str, now: i64) -> bool {
    let Some(issued) = cookie.split_once('.').and_then(|(t, _)| t.parse::<i64>().ok()) else { return false };
    now.checked_sub(issued).is_some_and(|age| (0..SESSION_SECS).contains(&age))
        && same(cookie.as_bytes(), session(token, issued).as_bytes())
}

/// The session cookie among `headers`' `Cookie` fields, if any.
fn cookie_of(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// `a == b` in time that depends on neither's content: both are hashed with a key drawn once,
/// and the digests compared byte by byte without stopping early.
fn same(a: &[u8], b: &[u8]) -> bool {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        for chunk in key.chunks_mut(8) {
            chunk.copy_from_slice(&crate::base::draw_u64().to_le_bytes());
        }
        key
    });
    let (x, y) = (crate::base::hmac_sha256(key, &[a]), crate::base::hmac_sha256(key, &[b]));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_token_rule() {
        let access = Access::Token(DashboardToken::new("0123456789abcdef-token\n").unwrap());
        assert!(!access.allows(&headers(&[])), "nothing given");
        assert!(access.allows(&headers(&[("authorization", "Bearer 0123456789abcdef-token")])));
        assert!(!access.allows(&headers(&[("authorization", "Bearer 0123456789abcdef-toke")])), "a prefix");
        assert!(!access.allows(&headers(&[("authorization", "Bearer 0123456789abcdef-tokenX")])), "longer");
        assert!(!access.allows(&headers(&[("authorization", "Basic 0123456789abcdef-token")])));
        let cookie = access.session().unwrap();
        assert_ne!(cookie, "0123456789abcdef-token", "the cookie is not the token");
        assert!(access.allows(&headers(&[("cookie", &format!("a=b; {COOKIE}={cookie}"))])));
        assert!(!access.allows(&headers(&[("cookie", &format!("{COOKIE}=0123456789abcdef-token"))])));
        assert!(!access.allows(&headers(&[("cookie", &format!("x{COOKIE}={cookie}"))])));
        assert!(access.accepts("0123456789abcdef-token"));
        assert!(!access.accepts(""));
        assert!(Access::Open.allows(&headers(&[])));
        assert!(DashboardToken::new("short").is_err(), "at least 16 characters");
        assert!(DashboardToken::new("0123456789abcdef ghij").is_err(), "no space inside");
        let token = DashboardToken::new("0123456789abcdef-token").unwrap();
        let at = 1_800_000_000;
        assert!(session_holds(&token, &session(&token, at), at + SESSION_SECS - 1));
        assert!(!session_holds(&token, &session(&token, at), at + SESSION_SECS), "a session ends");
        assert!(!session_holds(&token, &session(&token, at + 10), at), "not from the future");
        let forged = session(&token, at).replacen(&at.to_string(), &(at + 100).to_string(), 1);
        assert!(!session_holds(&token, &forged, at + 200), "its time is under the MAC");
        let other = DashboardToken::new("another-token-0123456789").unwrap();
        assert!(!session_holds(&other, &session(&token, at), at + 1), "a new token ends every session");
        assert!(!session_holds(&token, "-9223372036854775808.00", at), "no overflow");
        assert!(!session_holds(&token, "9223372036854775807.00", i64::MIN), "no overflow");
    }

    #[test]
    fn loopback_answers_loopback_hosts_only() {
        let access = Access::Loopback;
        for host in ["localhost:9090", "127.0.0.1:9090", "[::1]:9090", "LOCALHOST", "127.0.0.2"] {
            assert!(access.answers_host(&headers(&[("host", host)])), "{host}");
        }
        for host in ["evil.example:9090", "localhost.evil.example", "10.0.0.1:9090", "[::2]:80"] {
            assert!(!access.answers_host(&headers(&[("host", host)])), "{host}");
        }
        assert!(!access.answers_host(&headers(&[])), "no host");
        assert!(Access::Open.answers_host(&headers(&[("host", "evil.example")])));
    }

    #[test]
    fn a_configuration_without_a_token_opens_nothing() {
        let config = Config::from_toml_str("[plans.free]\nrate = \"1/s\"\n").unwrap();
        assert!(matches!(Access::from_config(&config), Err(AccessError::NoToken)));
    }
}
