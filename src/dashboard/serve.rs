//! [`Dashboard`]: a request answered, for whichever door mounts it.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};

use super::access::{Access, COOKIE};
use super::html::{Esc, Page};
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
}

impl Dashboard {
    /// The dashboard of the stores `admin` administers, without a running engine (what
    /// `tollgate dashboard` serves): no node page, no refusals of this node.
    #[must_use]
    pub fn new(admin: Admin, access: Access) -> Self {
        Self { inner: Arc::new(Inner { admin, engine: None, access }) }
    }

    /// The dashboard of a running engine: its stores and configuration, its node page (its
    /// [`Stats`](crate::report::Stats), open holds, store health) and its recent refusals per tenant.
    #[must_use]
    pub fn for_engine(engine: &Tollgate, access: Access) -> Self {
        Self { inner: Arc::new(Inner { admin: Admin::for_engine(engine), engine: Some(engine.clone()), access }) }
    }

    /// Answers `request`, whose path is relative to where the dashboard is mounted (`base`, as
    /// the links of its pages start: `""` at the root, `/ops` under `/ops`). Pages answer `GET`
    /// and `HEAD`; `POST /login` takes the login form (at most [`MAX_BODY`] bytes). Without the
    /// token: 401 and the login form, nothing else rendered.
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
        if path == "/login" {
            return match parts.method {
                Method::POST => self.login(base, body),
                _ if is_read(&parts.method) => login_page(base, StatusCode::OK),
                _ => not_allowed("GET, HEAD, POST"),
            };
        }
        if !is_read(&parts.method) {
            return not_allowed("GET, HEAD");
        }
        if !self.inner.access.answers_host(&parts.headers) {
            return answer(
                StatusCode::MISDIRECTED_REQUEST,
                "text/plain; charset=utf-8",
                "this dashboard answers to localhost only\n".to_owned(),
            );
        }
        if !self.inner.access.allows(&parts.headers) {
            return login_page(base, StatusCode::UNAUTHORIZED);
        }
        let query = |name: &str| {
            form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.chars().take(crate::admin::MAX_SEARCH_LEN).collect::<String>())
        };
        // A whole API key pasted in the search box: answered with a redirect to its prefix, so
        // the key leaves the address bar and the history at once (the page never echoes it).
        if let Some(q) = query("q") {
            let cut = crate::admin::search_text(&q);
            if (cut.starts_with("tg_live_") || cut.starts_with("tg_test_")) && cut != q.trim() {
                let mut r = answer(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", String::new());
                let location = format!("{base}/?q={}", super::html::Seg(&cut));
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
        }
        let admin = &self.inner.admin;
        let engine = self.inner.engine.as_ref();
        let node = engine.is_some();
        let page = match path {
            "/" | "/tenants" => data::tenants(admin, query("q").as_deref(), query("after").as_deref())
                .await
                .map(|d| Some(pages::tenants(base, node, &d))),
            "/plans" => data::plans(admin).await.map(|d| Some(pages::plans(base, node, &d))),
            "/billing" => data::billing(admin).await.map(|d| Some(pages::billing(base, node, &d))),
            "/alerts" => data::alerts(admin).await.map(|d| Some(pages::alerts(base, node, &d))),
            "/node" => match engine {
                Some(engine) => Ok(Some(pages::node(base, &data::node(admin, engine).await))),
                None => Ok(None),
            },
            _ => match path.strip_prefix("/tenants/").map(decode) {
                Some(Some(id)) => {
                    data::tenant(admin, engine, &id).await.map(|d| d.map(|d| pages::tenant(base, node, &d)))
                }
                _ => Ok(None),
            },
        };
        match page {
            Ok(Some(html)) => answer(StatusCode::OK, "text/html; charset=utf-8", html),
            Ok(None) => message(base, node, StatusCode::NOT_FOUND, "Not found", "no such page or tenant"),
            Err(AdminError::Store(e)) => message(
                base,
                node,
                StatusCode::SERVICE_UNAVAILABLE,
                "Store unavailable",
                &format!("the store did not answer: {e}"),
            ),
            Err(e) => message(base, node, StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()),
        }
    }

    /// The login form posted: the token checked, a session cookie set.
    fn login(&self, base: &str, body: &Bytes) -> Response<Bytes> {
        if body.len() > MAX_BODY {
            return answer(StatusCode::PAYLOAD_TOO_LARGE, "text/plain; charset=utf-8", "too large".to_owned());
        }
        let given = form_urlencoded::parse(body).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned());
        if !given.is_some_and(|t| self.inner.access.accepts(&t)) {
            return login_page(base, StatusCode::UNAUTHORIZED);
        }
        let mut r = answer(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", String::new());
        let location = format!("{base}/");
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        if let Some(session) = self.inner.access.session() {
            let path = if base.is_empty() { "/" } else { base };
            let cookie = format!(
                "{COOKIE}={session}; Path={path}; Max-Age={}; HttpOnly; SameSite=Strict",
                super::access::SESSION_SECS
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
        }
        r
    }
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

/// The login form alone: what a request without the token sees.
fn login_page(base: &str, status: StatusCode) -> Response<Bytes> {
    let mut p = Page::new(base, "Sign in", "", false);
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

fn message(base: &str, node: bool, status: StatusCode, title: &str, text: &str) -> Response<Bytes> {
    let mut p = Page::new(base, title, "", node);
    p.fmt(format_args!("<p class=\"message\">{}</p>", Esc(text)));
    answer(status, "text/html; charset=utf-8", p.finish())
}
