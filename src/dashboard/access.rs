//! Who may read the dashboard: an access token, compared in constant time, given as
//! `Authorization: Bearer` or through the login form, which sets a session cookie derived from
//! it; or nobody checked, when the application says so.

use crate::config::{Config, DashboardToken};

/// The session cookie's name over plain HTTP (a loopback address, or a proxy that does not say
/// the client came over TLS): its `Path` is the dashboard's.
pub(crate) const COOKIE: &str = "tollgate_dashboard";

/// The session cookie's name over TLS: `Secure`, `Path=/`, no `Domain`, which the `__Host-`
/// prefix makes browsers check, so no other host or plain-HTTP page can set or shadow it.
pub(crate) const HOST_COOKIE: &str = "__Host-tollgate_dashboard";

/// How long a session of the login form lasts (12 hours), its cookie's `Max-Age`.
pub const SESSION_SECS: i64 = 12 * 3600;

/// Who may read the dashboard.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Access {
    /// Whoever shows this token: `Authorization: Bearer <token>`, or the login form, which sets
    /// a session cookie (`HttpOnly`, `SameSite=Strict`) derived from it. The token is this one
    /// for the dashboard's life; [`Configured`](Self::Configured) follows reloads.
    Token(DashboardToken),
    /// Whoever shows the token of the configuration in force (`[dashboard] token_file`), read
    /// at each request: mounted for a running engine
    /// ([`Dashboard::for_engine`](super::Dashboard::for_engine)), a
    /// [`Tollgate::reload`](crate::Tollgate::reload) with a new token takes effect at the next
    /// request and ends every session of the old one; a reload that names no token shuts
    /// everyone out. What [`Access::from_config`] gives.
    Configured,
    /// Everyone who reaches the router: for an application that puts its own authentication in
    /// front of it. An explicit choice: no constructor falls back to it.
    Open,
    /// No token, for a dashboard listening on a loopback address only (`tollgate dashboard`
    /// without one, over a local SQLite file alone): requests must name a loopback host
    /// (`localhost`, `127.0.0.1`, `[::1]`, any port) in `Host`, so that a web page whose name
    /// an attacker points at 127.0.0.1 (DNS rebinding) is answered 421 rather than read.
    /// HTTP/1.1 only: an HTTP/2 request carries its host as `:authority`, not `Host`, and is
    /// answered 421.
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

/// The rule one request meets: [`Access`] with the configuration's token of the moment.
#[derive(Debug)]
pub(crate) enum Rule {
    /// The token must be shown.
    Token(DashboardToken),
    /// Nothing is checked.
    Open,
    /// Loopback hosts only, nothing else checked.
    Loopback,
    /// [`Access::Configured`] under a configuration that names no token: nobody.
    Nobody,
}

impl Access {
    /// The configuration's `[dashboard] token_file` token, followed through reloads:
    /// [`Access::Configured`].
    ///
    /// # Errors
    /// [`AccessError::NoToken`] when the configuration names none: a dashboard is never open
    /// by default.
    pub fn from_config(config: &Config) -> Result<Self, AccessError> {
        match config.dashboard().token {
            Some(_) => Ok(Access::Configured),
            None => Err(AccessError::NoToken),
        }
    }

    /// The rule in force, `configured` giving the configuration's token of the moment (the
    /// engine's, or the one the administration was opened with).
    pub(crate) fn rule(&self, configured: impl FnOnce() -> Option<DashboardToken>) -> Rule {
        match self {
            Access::Token(token) => Rule::Token(token.clone()),
            Access::Configured => match configured() {
                Some(token) => Rule::Token(token),
                None => Rule::Nobody,
            },
            Access::Open => Rule::Open,
            Access::Loopback => Rule::Loopback,
        }
    }
}

impl Rule {
    /// Whether `headers` name a host this rule answers: any but for
    /// [`Loopback`](Self::Loopback).
    pub(crate) fn answers_host(&self, headers: &http::HeaderMap) -> bool {
        if !matches!(self, Rule::Loopback) {
            return true;
        }
        let Some(host) = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()) else { return false };
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether the rule asks for nothing: open, or loopback (its host checked apart).
    pub(crate) fn checks_nothing(&self) -> bool {
        matches!(self, Rule::Open | Rule::Loopback)
    }

    /// The session of `headers`' cookie, if it is one of this rule's token still in force at
    /// `now`: the cookie's value.
    pub(crate) fn session_of<'h>(&self, headers: &'h http::HeaderMap, now: i64) -> Option<&'h str> {
        self.sessions_of(headers, now).next()
    }

    /// Every session in force among `headers`' cookies (a browser may send both names).
    pub(crate) fn sessions_of<'h>(&self, headers: &'h http::HeaderMap, now: i64) -> impl Iterator<Item = &'h str> {
        let token = match self {
            Rule::Token(token) => Some(token.clone()),
            _ => None,
        };
        cookies_of(headers).filter(move |c| token.as_ref().is_some_and(|t| session_holds(t, c, now)))
    }

    /// A digest of the token in force (`None` without one), to tell when it changes.
    pub(crate) fn fingerprint(&self) -> Option<[u8; 32]> {
        match self {
            Rule::Token(token) => {
                Some(crate::base::hmac_sha256(token.expose().as_bytes(), &[b"tollgate dashboard token in force"]))
            }
            Rule::Open | Rule::Loopback | Rule::Nobody => None,
        }
    }

    /// What `headers`' `Authorization: Bearer` says: `None` without one, else whether it is
    /// the token (always false for [`Nobody`](Self::Nobody)).
    pub(crate) fn bearer(&self, headers: &http::HeaderMap) -> Option<bool> {
        let mut given = headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .peekable();
        given.peek()?;
        Some(given.any(|g| self.accepts(g)))
    }

    /// Whether `given` (a bearer's, or the login form's) is the token.
    pub(crate) fn accepts(&self, given: &str) -> bool {
        match self {
            Rule::Token(token) => same(given.trim().as_bytes(), token.expose().as_bytes()),
            Rule::Open | Rule::Loopback => true,
            Rule::Nobody => false,
        }
    }

    /// The session cookie's value for a login at `now`.
    pub(crate) fn session(&self, now: i64) -> Option<String> {
        match self {
            Rule::Token(token) => Some(session(token, now)),
            Rule::Open | Rule::Loopback | Rule::Nobody => None,
        }
    }
}

/// When a session cookie of `issued` ends.
pub(crate) fn session_ends(cookie: &str) -> Option<i64> {
    cookie.split_once('.').and_then(|(t, _)| t.parse::<i64>().ok()).and_then(|t| t.checked_add(SESSION_SECS))
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

/// The session cookies among `headers`' `Cookie` fields, under either name.
fn cookies_of(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE || *name == HOST_COOKIE)
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

    const TOKEN: &str = "0123456789abcdef-token-of-32-chars";

    #[test]
    fn the_token_rule() {
        let rule = Access::Token(DashboardToken::new(&format!("{TOKEN}\n")).unwrap()).rule(|| None);
        let at = 1_800_000_000;
        assert_eq!(rule.bearer(&headers(&[])), None, "nothing given");
        assert_eq!(rule.bearer(&headers(&[("authorization", &format!("Bearer {TOKEN}"))])), Some(true));
        assert_eq!(rule.bearer(&headers(&[("authorization", &format!("Bearer {}", &TOKEN[1..]))])), Some(false));
        assert_eq!(rule.bearer(&headers(&[("authorization", &format!("Bearer {TOKEN}X"))])), Some(false));
        assert_eq!(rule.bearer(&headers(&[("authorization", &format!("Basic {TOKEN}"))])), None);
        let cookie = rule.session(at).unwrap();
        assert_ne!(cookie, TOKEN, "the cookie is not the token");
        assert!(rule.session_of(&headers(&[("cookie", &format!("a=b; {COOKIE}={cookie}"))]), at).is_some());
        assert!(rule.session_of(&headers(&[("cookie", &format!("{HOST_COOKIE}={cookie}"))]), at).is_some());
        assert!(rule.session_of(&headers(&[("cookie", &format!("{COOKIE}={TOKEN}"))]), at).is_none());
        assert!(rule.session_of(&headers(&[("cookie", &format!("x{COOKIE}={cookie}"))]), at).is_none());
        assert!(rule.accepts(TOKEN));
        assert!(!rule.accepts(""));
        assert!(Access::Open.rule(|| None).accepts(""));
        assert!(!Access::Configured.rule(|| None).accepts(""), "a configuration without a token lets nobody in");
        let token = DashboardToken::new(TOKEN).unwrap();
        assert!(session_holds(&token, &session(&token, at), at + SESSION_SECS - 1));
        assert!(!session_holds(&token, &session(&token, at), at + SESSION_SECS), "a session ends");
        assert!(!session_holds(&token, &session(&token, at + 10), at), "not from the future");
        let forged = session(&token, at).replacen(&at.to_string(), &(at + 100).to_string(), 1);
        assert!(!session_holds(&token, &forged, at + 200), "its time is under the MAC");
        let other = DashboardToken::new("another-token-0123456789-abcdefgh").unwrap();
        assert!(!session_holds(&other, &session(&token, at), at + 1), "a new token ends every session");
        assert!(!session_holds(&token, "-9223372036854775808.00", at), "no overflow");
        assert!(!session_holds(&token, "9223372036854775807.00", i64::MIN), "no overflow");
        assert_eq!(session_ends(&session(&token, at)), Some(at + SESSION_SECS));
    }

    #[test]
    fn tokens_that_are_short_or_plainly_not_random_are_refused() {
        for bad in [
            "short",
            "0123456789abcdef0123456789abcde",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "abcdeabcdeabcdeabcdeabcdeabcdeabcde",
            "0123456789abcdef0123456789abcdef",
            "password1234password1234password",
            "0123456789abcdef ghij0123456789abcdef",
        ] {
            let why = DashboardToken::new(bad).unwrap_err();
            assert!(why.contains("openssl rand -hex 32"), "{bad}: {why}");
        }
        for good in [TOKEN, "5f0c1a9e3b7d24c8a6e0f19b3d7c5a2e", "Zm9vYmFyYmF6cXV4LTEyMzQ1Njc4OTAtYWJj"] {
            assert!(DashboardToken::new(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn loopback_answers_loopback_hosts_only() {
        let rule = Access::Loopback.rule(|| None);
        for host in ["localhost:9090", "127.0.0.1:9090", "[::1]:9090", "LOCALHOST", "127.0.0.2"] {
            assert!(rule.answers_host(&headers(&[("host", host)])), "{host}");
        }
        for host in ["evil.example:9090", "localhost.evil.example", "10.0.0.1:9090", "[::2]:80"] {
            assert!(!rule.answers_host(&headers(&[("host", host)])), "{host}");
        }
        assert!(!rule.answers_host(&headers(&[])), "no host");
        assert!(Access::Open.rule(|| None).answers_host(&headers(&[("host", "evil.example")])));
    }

    #[test]
    fn a_configuration_without_a_token_opens_nothing() {
        let config = Config::from_toml_str("[plans.free]\nrate = \"1/s\"\n").unwrap();
        assert!(matches!(Access::from_config(&config), Err(AccessError::NoToken)));
    }
}
