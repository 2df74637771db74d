//! [`Dashboard`]: a request answered, for whichever door mounts it.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};

use super::access::{Access, Rule, COOKIE, HOST_COOKIE, SESSION_SECS};
use super::guard::{Client, SignedOut, Tries};
use super::html::{Esc, Frame, Page};
use super::{data, pages};
use crate::{admin::Admin, admin::AdminError, engine::Tollgate};

/// The most bytes of a request body the dashboard reads (its login form's).
pub const MAX_BODY: usize = 4096;

/// The Content-Security-Policy of every answer: nothing but the dashboard's own stylesheet is
/// loaded, no script runs, forms post only to the dashboard, and no page can be framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("dashboard.css");

/// The operator dashboard: read-only pages of the tenants, billing, alerts and (mounted in a
/// running application) the node, read through [`Admin`]. A cheap `Clone` handle.
///
/// A front door hands it each request under the path it is mounted at
/// (`tollgate_axum::dashboard`, `tollgate_actix::dashboard`, `tollgate dashboard`); see the
/// [dashboard guide](crate::guide::dashboard).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tollgate::dashboard::{Access, Dashboard};
///
/// let config = tollgate::Config::from_toml_str("[store]\nkind = \"memory\"\n[plans.free]\nrate = \"10/s\"\n").unwrap();
/// let (engine, _worker) = tollgate::Tollgate::builder(config).build();
/// let token = tollgate::config::DashboardToken::new("an-access-token-of-32-characters").unwrap();
/// let dashboard = Dashboard::for_engine(&engine, Access::Token(token));
///
/// let request = http::Request::get("/").body(bytes::Bytes::new()).unwrap();
/// let response = dashboard.respond("/ops", request).await;
/// assert_eq!(response.status(), 401); // no token, nothing rendered
///
/// let request = http::Request::get("/")
///     .header("authorization", "Bearer an-access-token-of-32-characters")
///     .body(bytes::Bytes::new())
///     .unwrap();
/// let response = dashboard.respond("/ops", request).await;
/// assert_eq!(response.status(), 200);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    admin: Admin,
    engine: Option<Tollgate>,
    access: Access,
    tries: Tries,
    signed_out: SignedOut,
}

impl Dashboard {
    /// The dashboard of the stores `admin` administers, without a running engine (what
    /// `tollgate dashboard` serves): no node page, no refusals of this node.
    #[must_use]
    pub fn new(admin: Admin, access: Access) -> Self {
        Self::with(admin, None, access)
    }

    /// The dashboard of a running engine: its stores and configuration, its node page (its
    /// [`Stats`](crate::report::Stats), open holds, store health) and its recent refusals per tenant.
    #[must_use]
    pub fn for_engine(engine: &Tollgate, access: Access) -> Self {
        Self::with(Admin::for_engine(engine), Some(engine.clone()), access)
    }

    fn with(admin: Admin, engine: Option<Tollgate>, access: Access) -> Self {
        let inner = Inner { admin, engine, access, tries: Tries::new(), signed_out: SignedOut::default() };
        Self { inner: Arc::new(inner) }
    }

    /// Answers `request`, whose path is relative to where the dashboard is mounted (`base`, as
    /// the links of its pages start: `""` at the root, `/ops` under `/ops`). Pages answer `GET`
    /// and `HEAD`; `POST /login` takes the login form (at most [`MAX_BODY`] bytes) and
    /// `POST /logout` ends the session. Without the token: 401 and the login form, nothing else
    /// rendered. A client address (its [`Client`] in the request's extensions) that has given a
    /// wrong token [`MAX_FAILED_TRIES`](super::MAX_FAILED_TRIES) times in a minute, as a bearer
    /// or through the form, is answered 429 without its token being compared until the minute
    /// ends; a session already open is still served.
    ///
    /// A `base` holding anything but letters, digits, `/`, `-`, `.`, `_`, `~` and `%` (a door
    /// that derives it from a path a client chose) is answered 404: it goes into links, the
    /// login's redirect and its cookie's `Path`.
    pub async fn respond(&self, base: &str, request: http::Request<Bytes>) -> Response<Bytes> {
        let base = base.trim_end_matches('/');
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        let head = parts.method == Method::HEAD;
        let safe = base.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-._~%".contains(&b))
            && (base.is_empty() || base.starts_with('/'))
            && !base.starts_with("//");
        let mut response = match safe {
            true => self.route(base, &parts, path, &body).await,
            false => answer(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n".to_owned()),
        };
        let h = response.headers_mut();
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
        if head {
            *response.body_mut() = Bytes::new();
        }
        response
    }

    async fn route(&self, base: &str, parts: &http::request::Parts, path: &str, body: &Bytes) -> Response<Bytes> {
        let path = if path.is_empty() { "/" } else { path };
        if path == "/assets/dashboard.css" {
            return match is_read(&parts.method) {
                true => {
                    let mut r = answer(StatusCode::OK, "text/css; charset=utf-8", CSS.to_owned());
                    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
                    r
                }
                false => not_allowed("GET, HEAD"),
            };
        }
        let inner = &*self.inner;
        let rule = inner.access.rule(|| match &inner.engine {
            Some(engine) => engine.dashboard_token(),
            None => inner.admin.config().and_then(|c| c.dashboard().token.clone()),
        });
        let now = inner.admin.clock().unix_secs();
        // The token in force changed (a reload, or one rolled back): the sessions issued
        // before end, so that a token rotated away and back does not bring its old ones back.
        if let Some(print) = rule.fingerprint() {
            inner.signed_out.token_in_force(print, now);
        }
        let client = parts.extensions.get::<Client>().copied().unwrap_or_default();
        // A form a browser posts from another site (the login, to bar the operator's address
        // with wrong tokens; the sign-out; the search) is refused before it is read.
        if parts.method == Method::POST && cross_site(parts) {
            return answer(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "a form posted from another site is refused\n".to_owned(),
            );
        }
        if path == "/login" {
            return match parts.method {
                Method::POST => self.login(&rule, base, parts, client, body, now),
                _ if is_read(&parts.method) => login_page(base, StatusCode::OK, None),
                _ => not_allowed("GET, HEAD, POST"),
            };
        }
        if path == "/logout" {
            return match parts.method {
                Method::POST => self.logout(&rule, base, &parts.headers, now),
                _ => not_allowed("POST"),
            };
        }
        let search = path == "/search";
        if search && parts.method != Method::POST {
            return not_allowed("POST");
        }
        if !search && !is_read(&parts.method) {
            return not_allowed("GET, HEAD");
        }
        if !rule.answers_host(&parts.headers) {
            return answer(
                StatusCode::MISDIRECTED_REQUEST,
                "text/plain; charset=utf-8",
                "this dashboard answers to localhost only\n".to_owned(),
            );
        }
        let session = rule.session_of(&parts.headers, now).filter(|c| !inner.signed_out.ended(c));
        if !rule.checks_nothing() && session.is_none() {
            let Some(right) = rule.bearer(&parts.headers) else {
                return login_page(base, StatusCode::UNAUTHORIZED, None);
            };
            if let Some(wait) = inner.tries.barred(client.address, now) {
                return too_many(base, wait);
            }
            if !right {
                inner.tries.failed(client.address, now);
                return login_page(base, StatusCode::UNAUTHORIZED, None);
            }
        }
        let query = |name: &str| {
            form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.chars().take(crate::admin::MAX_SEARCH_LEN).collect::<String>())
        };
        let admin = &inner.admin;
        // The search form posts its text, so that a whole API key pasted stays out of the
        // address bar, the history and the logs: a key found by its hash (one read) opens its
        // tenant's page; other text is searched, a key's cut to its prefix. A whole key given
        // in the address (`?q=`) is answered the same way, and leaves the address bar at once.
        let typed = match search {
            true if body.len() > MAX_BODY => {
                return answer(StatusCode::PAYLOAD_TOO_LARGE, "text/plain; charset=utf-8", "too large".to_owned());
            }
            true => form_urlencoded::parse(body).find(|(k, _)| k == "q").map(|(_, v)| v.into_owned()),
            // Read whole (not cut first): a key late in a long text is still cut away.
            false => form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                .find(|(k, _)| k == "q")
                .map(|(_, v)| v.into_owned())
                .filter(|q| {
                    let lower = q.to_ascii_lowercase();
                    (lower.contains("tg_live_") || lower.contains("tg_test_"))
                        && crate::admin::search_text(q) != q.trim()
                }),
        };
        if search || typed.is_some() {
            let typed = typed.unwrap_or_default();
            return match admin.key_owner(&typed).await {
                Ok(Some((tenant, _))) => see_other(&format!("{base}/tenants/{}", super::html::Seg(tenant.id.as_str()))),
                Ok(None) => {
                    let cut = crate::admin::search_text(&typed);
                    see_other(&format!("{base}/tenants?q={}", super::html::Seg(&cut)))
                }
                Err(e) => message(
                    base,
                    Frame::default(),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Store unavailable",
                    &e.to_string(),
                ),
            };
        }
        // The list was the home before the overview: an address of the list's (a search, a
        // filter, a page) is the list's still.
        if path == "/" && ["q", "plan", "state", "sort", "after"].into_iter().any(|name| query(name).is_some()) {
            if let Some(q) = parts.uri.query() {
                return see_other(&format!("{base}/tenants?{q}"));
            }
        }
        let engine = inner.engine.as_ref();
        let view = data::ListView::from_query(query("plan"), query("state"), query("sort"));
        let frame = Frame {
            node: engine.is_some(),
            signed_in: session.is_some(),
            as_of: Some(now),
            refresh: query("refresh").is_some_and(|r| r == "on"),
            keep: match (path, query("after")) {
                ("/tenants", _) => pages::view_query(&view),
                ("/money", Some(after)) => format!("after={}", super::html::Seg(&after)),
                ("/audit", _) => {
                    query("tenant").map(|t| format!("tenant={}", super::html::Seg(&t))).unwrap_or_default()
                }
                _ => String::new(),
            },
        };
        let page = match path {
            "/" => Ok(Some(pages::overview(base, frame.clone(), &data::overview(admin).await))),
            "/tenants" => data::tenants(admin, query("q").as_deref(), query("after").as_deref(), view)
                .await
                .map(|d| Some(pages::tenants(base, frame.clone(), &d))),
            "/plans" => data::plans(admin).await.map(|d| Some(pages::plans(base, frame.clone(), &d))),
            "/money" => {
                data::money(admin, query("after").as_deref()).await.map(|d| Some(pages::money(base, frame.clone(), &d)))
            }
            "/billing" => data::billing(admin).await.map(|d| Some(pages::billing(base, frame.clone(), &d))),
            "/alerts" => data::alerts(admin).await.map(|d| Some(pages::alerts(base, frame.clone(), &d))),
            "/audit" => data::audit(admin, query("tenant").as_deref(), query("before").as_deref())
                .await
                .map(|d| Some(pages::audit(base, frame.clone(), &d))),
            "/node" => match engine {
                Some(engine) => Ok(Some(pages::node(base, frame.clone(), &data::node(admin, engine).await))),
                None => Ok(None),
            },
            _ => match path.strip_prefix("/tenants/").map(decode) {
                Some(Some(id)) => {
                    data::tenant(admin, engine, &id).await.map(|d| d.map(|d| pages::tenant(base, frame.clone(), &d)))
                }
                _ => Ok(None),
            },
        };
        match page {
            Ok(Some(html)) => answer(StatusCode::OK, "text/html; charset=utf-8", html),
            Ok(None) => message(base, frame, StatusCode::NOT_FOUND, "Not found", "no such page or tenant"),
            Err(AdminError::Store(e)) => message(
                base,
                frame,
                StatusCode::SERVICE_UNAVAILABLE,
                "Store unavailable",
                &format!("the store did not answer: {e}"),
            ),
            Err(e) => message(base, frame, StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()),
        }
    }

    /// The login form posted: the token checked (unless the address has used up its tries), a
    /// session cookie set.
    fn login(
        &self,
        rule: &Rule,
        base: &str,
        parts: &http::request::Parts,
        client: Client,
        body: &Bytes,
        now: i64,
    ) -> Response<Bytes> {
        if body.len() > MAX_BODY {
            return answer(StatusCode::PAYLOAD_TOO_LARGE, "text/plain; charset=utf-8", "too large".to_owned());
        }
        if let Some(wait) = self.inner.tries.barred(client.address, now) {
            return too_many(base, wait);
        }
        let given = form_urlencoded::parse(body).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned());
        if !given.is_some_and(|t| rule.accepts(&t)) {
            self.inner.tries.failed(client.address, now);
            return login_page(base, StatusCode::UNAUTHORIZED, None);
        }
        let mut r = see_other(&format!("{base}/"));
        if let Some(session) = rule.session(now) {
            let cookie = match secure(parts, client) {
                true => format!(
                    "{HOST_COOKIE}={session}; Path=/; Max-Age={SESSION_SECS}; Secure; HttpOnly; SameSite=Strict"
                ),
                false => format!(
                    "{COOKIE}={session}; Path={}; Max-Age={SESSION_SECS}; HttpOnly; SameSite=Strict",
                    if base.is_empty() { "/" } else { base }
                ),
            };
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
        }
        r
    }

    /// `POST /logout`: every session the request shows ends on this node (a browser may hold
    /// both cookies), and the browser forgets them.
    fn logout(&self, rule: &Rule, base: &str, headers: &http::HeaderMap, now: i64) -> Response<Bytes> {
        for cookie in rule.sessions_of(headers, now) {
            self.inner.signed_out.end(cookie, now);
        }
        let mut r = see_other(&format!("{base}/login"));
        let path = if base.is_empty() { "/" } else { base };
        for cookie in [
            format!("{HOST_COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"),
            format!("{COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict"),
        ] {
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        r
    }
}

/// Whether a browser says the request comes from another site: `Sec-Fetch-Site` other than
/// `same-origin` or `none` (a sibling subdomain is another site here), or else an `Origin`
/// whose host is not the request's. A client that sends neither (curl, a script) is not a
/// browser another site can drive.
fn cross_site(parts: &http::request::Parts) -> bool {
    let text = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(site) = text("sec-fetch-site") {
        return !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none"));
    }
    let Some(origin) = text("origin") else { return false };
    let from = origin.split_once("://").map_or(origin, |(_, host)| host);
    let host = text("host").or_else(|| parts.uri.authority().map(http::uri::Authority::as_str));
    !host.is_some_and(|host| host.eq_ignore_ascii_case(from))
}

/// Whether the client came over TLS: its door says so ([`Client::tls`]), its URI's scheme is
/// `https` (HTTP/2), or a proxy says so (`X-Forwarded-Proto: https`, `Forwarded: proto=https`).
/// A client claiming it falsely over plain HTTP only gets a cookie its browser will not keep.
fn secure(parts: &http::request::Parts, client: Client) -> bool {
    let said = |name: &str, f: &dyn Fn(&str) -> bool| {
        parts.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|p| f(p.trim())))
    };
    client.tls
        || parts.uri.scheme() == Some(&http::uri::Scheme::HTTPS)
        || said("x-forwarded-proto", &|p| p.eq_ignore_ascii_case("https"))
        || said("forwarded", &|p| {
            p.split(';').any(|kv| {
                kv.trim().split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("proto") && v.trim().trim_matches('"').eq_ignore_ascii_case("https")
                })
            })
        })
}

fn see_other(location: &str) -> Response<Bytes> {
    let mut r = answer(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", String::new());
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// 429: the address has used up its tries of the token.
fn too_many(base: &str, wait: i64) -> Response<Bytes> {
    let text = format!("too many wrong tokens from this address: try again in {wait} s");
    let mut r = login_page(base, StatusCode::TOO_MANY_REQUESTS, Some(&text));
    if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn is_read(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

/// A path segment percent-decoded (`None`: not UTF-8, or empty).
fn decode(segment: &str) -> Option<String> {
    let text = percent_encoding::percent_decode_str(segment).decode_utf8().ok()?;
    (!text.is_empty()).then(|| text.into_owned())
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn not_allowed(allow: &'static str) -> Response<Bytes> {
    let mut r = answer(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "method not allowed".to_owned());
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The login form alone: what a request without the token sees, with `note` above it.
fn login_page(base: &str, status: StatusCode, note: Option<&str>) -> Response<Bytes> {
    let mut p = Page::new(base, "Sign in", "", Frame::default());
    if let Some(note) = note {
        p.fmt(format_args!("<p class=\"message\">{}</p>", Esc(note)));
    }
    p.fmt(format_args!(
        "<section class=\"login\"><p>This dashboard needs its access token.</p>\
         <form method=\"post\" action=\"{}/login\"><input type=\"password\" name=\"token\" \
         autocomplete=\"current-password\" aria-label=\"access token\" required><button type=\"submit\">Sign in</button>\
         </form></section>",
        Esc(base)
    ));
    let mut r = answer(status, "text/html; charset=utf-8", p.finish());
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tollgate dashboard\""));
    }
    r
}

fn message(base: &str, frame: Frame, status: StatusCode, title: &str, text: &str) -> Response<Bytes> {
    let mut p = Page::new(base, title, "", frame);
    p.fmt(format_args!("<p class=\"message\">{}</p>", Esc(text)));
    answer(status, "text/html; charset=utf-8", p.finish())
}
