//! The per-request fast path for front doors: the configuration cached per door, so a request
//! costs one relaxed load to see whether a reload replaced it.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::engine::{
    admit::{
        stage::{Admission, Decision, RequestInfo},
        ticket::Pass,
    },
    shared::Shared,
    Tollgate,
};
use crate::tenant::Credential;
use crate::tenant::Identity;
use crate::{
    config::Identify,
    plan::Runtime,
    response::{put_header, Rejection, RejectionKind, IDEMPOTENT_REPLAYED, REPEATED_IDEMPOTENCY_KEY, REPEATED_KEY},
};

/// The address of the client that sent a request, as its front door saw it: the peer of the
/// connection (actix-web, axum with `ConnectInfo`), or the source IP in a Lambda event. Every
/// front door puts it in the request extensions, in this one type, for the handlers and for
/// per-client limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub std::net::IpAddr);

/// What the engine reads of a request, for a front door whose request type is not
/// [`http::Request`] (actix-web's, say): [`FrontDoor::admit_request`] then decides on it
/// exactly as the tower layer decides on an `http::Request`: the same credential (the
/// configured API key header, or an [`Identity`] in the extensions), the same
/// `Idempotency-Key` rules, the same rejections.
pub trait RequestView {
    /// The method, such as `GET`.
    fn method(&self) -> &str;
    /// The path, without the query string.
    fn path(&self) -> &str;
    /// The query string, without the `?`.
    fn query(&self) -> Option<&str>;
    /// The values of the header `name` (given in lowercase), in order.
    fn header_values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s [u8]>;
    /// The [`Identity`] an authentication layer put in the request, if any.
    fn identity(&self) -> Option<&Identity>;

    /// The peer address of the connection (the [`ClientAddr`] the front door put in the
    /// request), for anonymous callers limited per address. `None` by default.
    fn client_addr(&self) -> Option<std::net::IpAddr> {
        None
    }

    /// The values of the header `name`, for requests that find a parsed name faster than its
    /// text (an [`http::HeaderMap`]): by default [`header_values`](Self::header_values) of
    /// `name.as_str()`. The API key header and `Idempotency-Key` are read through it.
    fn header_values_named<'s>(&'s self, name: &http::HeaderName) -> impl Iterator<Item = &'s [u8]> {
        self.header_values(name.as_str())
    }

    /// Whether the request's method is `method`, for requests that compare a parsed method
    /// faster than its name (an [`http::Request`]): by default [`method`](Self::method)
    /// compared with `method.as_str()`. The usage route ([`Tollgate::tenant_usage`]) tells `GET`
    /// and `HEAD` through it.
    fn method_is(&self, method: &http::Method) -> bool {
        self.method() == method.as_str()
    }
}

/// An [`http::Request`] as the engine reads it: the tower layer (and the routes the doors
/// mount outside it, such as [`Tollgate::tenant_usage`]) describe requests through
/// [`RequestView`], as the other front doors do.
impl<B> RequestView for http::Request<B> {
    #[inline]
    fn method(&self) -> &str {
        http::Request::method(self).as_str()
    }

    #[inline]
    fn path(&self) -> &str {
        self.uri().path()
    }

    #[inline]
    fn query(&self) -> Option<&str> {
        self.uri().query()
    }

    #[inline]
    fn header_values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s [u8]> {
        self.headers().get_all(name).iter().map(http::HeaderValue::as_bytes)
    }

    #[inline]
    fn header_values_named<'s>(&'s self, name: &http::HeaderName) -> impl Iterator<Item = &'s [u8]> {
        values_of(self.headers(), name)
    }

    #[inline]
    fn method_is(&self, method: &http::Method) -> bool {
        http::Request::method(self) == method
    }

    #[inline]
    fn identity(&self) -> Option<&Identity> {
        self.extensions().get::<Identity>()
    }

    /// The [`ClientAddr`] the front door put in the request.
    #[inline]
    fn client_addr(&self) -> Option<std::net::IpAddr> {
        self.extensions().get::<ClientAddr>().map(|a| a.0)
    }
}

/// Up to how many header values [`values_of`] compares names one by one rather than hashing.
const SCAN_UP_TO: usize = 6;

/// The values of the header `name` in `headers`, in order, as [`http::HeaderMap::get_all`]
/// gives them, without hashing `name` when the map is small. A request carries a few
/// headers; comparing each name with `name` (a discriminant, or a length and bytes) costs less
/// than the map's hash of a name (FNV a byte at a time over its discriminant and every byte of
/// a custom name: about 150 instructions for `x-api-key`), so up to [`SCAN_UP_TO`] values the
/// names are compared, past it the map hashes. Every `http::Request` identified by an API key
/// header (the tower layer, Lambda) pays this for that header, and every response of the tower
/// layer with a header for its `Content-Type` (whether it is a gRPC answer); an
/// `Idempotency-Key`, a hold's estimate header and `If-None-Match` are read through it too.
/// (actix-web's door reads actix's map.)
///
/// The scan gives the values in `get_all`'s order because [`http::HeaderMap::iter`] walks
/// each name's values together in the order they were added (`http` documents its order only
/// as consistent: the unit test below would fail on an `http` that changed it).
#[inline]
pub(crate) fn values_of<'h, 'n>(headers: &'h http::HeaderMap, name: &'n http::HeaderName) -> HeaderValues<'h, 'n> {
    if headers.len() <= SCAN_UP_TO {
        HeaderValues::Scan { all: headers.iter(), name }
    } else {
        HeaderValues::Hashed(headers.get_all(name).iter())
    }
}

/// The values [`values_of`] finds.
pub(crate) enum HeaderValues<'h, 'n> {
    /// Every header of a small map, those named `name` kept.
    Scan { all: http::header::Iter<'h, http::HeaderValue>, name: &'n http::HeaderName },
    /// The map's own lookup.
    Hashed(http::header::ValueIter<'h, http::HeaderValue>),
}

impl<'h> Iterator for HeaderValues<'h, '_> {
    type Item = &'h [u8];

    #[inline]
    fn next(&mut self) -> Option<&'h [u8]> {
        match self {
            HeaderValues::Scan { all, name } => all.find(|(n, _)| *n == *name).map(|(_, v)| v.as_bytes()),
            HeaderValues::Hashed(values) => values.next().map(http::HeaderValue::as_bytes),
        }
    }
}

/// The header of the `Idempotency-Key`.
static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// The credential of a request as `[identify]` says, the one rule of every front door: the
/// values of the API key header (`api_key` reads them), or the [`Identity`] an authentication
/// layer put in the request (`identity` reads it).
#[inline]
pub(crate) fn credential_by<'a, 'i, I: Iterator<Item = &'a [u8]>>(
    identify: &'i Identify,
    api_key: impl FnOnce(&'i http::HeaderName) -> I,
    identity: impl FnOnce() -> Option<&'a Identity>,
) -> Credential<'a> {
    match identify {
        Identify::ApiKey { header } => credential_in(api_key(header)),
        Identify::Extension => match identity() {
            Some(identity) => Credential::Tenant(identity.tenant().as_str()),
            None => Credential::Missing,
        },
    }
}

/// The credential in the values of the API key header: none, one, or a repeated header
/// (malformed; a key with a comma, a repeated header joined by a proxy, is refused when the
/// key is checked). Shared by every front door.
#[inline]
fn credential_in<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Credential<'a> {
    match (values.next(), values.next()) {
        (None, _) => Credential::Missing,
        (Some(v), None) => Credential::ApiKey(v),
        (Some(_), Some(_)) => Credential::Malformed(REPEATED_KEY),
    }
}

/// The request the engine decides on, as every front door describes it: the
/// `Idempotency-Key` is read (from `keys`) only on methods that honour it, a repeated one is
/// refused, and a key binds the request's `query` too.
#[inline]
fn describe<'a, I: Iterator<Item = &'a [u8]>>(
    info: RequestInfo<'a>,
    query: Option<&'a str>,
    honoured: bool,
    keys: impl FnOnce() -> I,
) -> Result<RequestInfo<'a>, Rejection> {
    if !honoured {
        return Ok(info);
    }
    let mut keys = keys();
    match (keys.next(), keys.next()) {
        (None, _) => Ok(info),
        (Some(key), None) => Ok(info.with_query(query).with_idempotency_key(key)),
        (Some(_), Some(_)) => Err(Rejection::new(RejectionKind::MalformedIdempotencyKey, REPEATED_IDEMPOTENCY_KEY)),
    }
}

/// Derefs to the engine's configuration slot, for [`arc_swap::Cache`].
#[derive(Clone)]
pub(crate) struct RuntimeSource(Arc<Shared>);

impl std::ops::Deref for RuntimeSource {
    type Target = ArcSwap<Runtime>;

    fn deref(&self) -> &ArcSwap<Runtime> {
        self.0.runtime()
    }
}

/// A front door's copy of the configuration in force: one relaxed load per request to see
/// whether a reload replaced it, instead of a shared-counter update.
#[derive(Clone)]
pub(crate) struct RuntimeCache(arc_swap::Cache<RuntimeSource, Arc<Runtime>>);

impl RuntimeCache {
    fn new(shared: Arc<Shared>) -> Self {
        Self(arc_swap::Cache::new(RuntimeSource(shared)))
    }

    #[inline]
    pub(crate) fn load(&mut self) -> &Arc<Runtime> {
        self.0.load()
    }
}

impl std::fmt::Debug for RuntimeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuntimeCache")
    }
}

/// A front door's handle on the engine, with the configuration in force cached: what the
/// tower layer uses per request, for other front doors (actix-web, Lambda) to use the same
/// way. Keep one per service (or per worker thread): it is cheap to clone, and every clone
/// serves the same engine.
///
/// ```
/// use tollgate::door::{Admission, Credential, RequestInfo};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let config = tollgate::Config::from_toml_str(
///     "[plans.free]\nrate = \"5/s\"\n[tenants.acme]\nplan = \"free\"\nkeys = [\"tg_acme\"]",
/// ).unwrap();
/// let (tollgate, _worker) = tollgate::Tollgate::builder(config).build();
/// let mut door = tollgate.front_door();
/// let admission = door.admit_with(|_identify| RequestInfo::new("GET", "/", Credential::ApiKey(b"tg_acme")));
/// let ticket = match admission {
///     Admission::Admitted(ticket) => ticket,
///     Admission::Pending(pending) => tollgate.resolve(pending).await.unwrap(),
///     Admission::Rejected(rejection) => panic!("{rejection}"),
/// };
/// assert!(ticket.complete(200));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FrontDoor {
    tollgate: Tollgate,
    runtime: RuntimeCache,
}

impl Tollgate {
    /// A [`FrontDoor`] on this engine.
    #[must_use]
    pub fn front_door(&self) -> FrontDoor {
        FrontDoor { tollgate: self.clone(), runtime: RuntimeCache::new(self.shared().clone()) }
    }
}

impl FrontDoor {
    /// The engine.
    #[must_use]
    pub fn engine(&self) -> &Tollgate {
        &self.tollgate
    }

    /// Decides on a request that `describe` builds from the configuration in force (or
    /// refuses before the engine sees it), with one load of the cached configuration.
    #[inline]
    /// `client` reads the client's address, only for a request served as the anonymous tenant
    /// when anonymous callers are limited per address.
    fn admit_raw<'x>(
        &'x mut self,
        describe: impl FnOnce(&'x Runtime) -> Result<RequestInfo<'x>, crate::response::Rejection>,
        client: impl FnOnce(&Runtime) -> Option<crate::tenant::Client>,
    ) -> Decision {
        let FrontDoor { tollgate, runtime } = self;
        let rt: &Arc<Runtime> = runtime.load();
        match describe(rt) {
            Ok(req) => {
                let mut admission = tollgate.gate().admit_in(rt, &req, || client(rt));
                if let Decision::Pending(pending) = &mut admission {
                    // It keeps the configuration it was decided under while it waits.
                    pending.rt = Some(rt.clone());
                }
                admission
            }
            Err(rejection) => Decision::Rejected(tollgate.gate().count(rejection)),
        }
    }

    /// The headers a route of the configuration in force reads (the estimates of `[[routes]]
    /// hold`, the dimension values of its `hold_values`): a door that builds [`RequestInfo`] itself gives their fields
    /// ([`RequestInfo::with_headers`]).
    pub fn hold_headers(&mut self) -> Vec<http::HeaderName> {
        self.runtime.load().hold_headers.to_vec()
    }

    /// Whether an `Idempotency-Key` on `method` is honoured (`limits.idempotency_methods`): a
    /// door reads the header only then.
    #[inline]
    pub fn honours_idempotency(&mut self, method: &str) -> bool {
        self.runtime.load().honours_idempotency(method)
    }

    /// Decides on a request of another framework, read through [`RequestView`], as the tower
    /// layer decides on an [`http::Request`]. Most requests of known tenants are decided
    /// here; the rest come back as [`Admission::Pending`], for [`Tollgate::resolve`].
    #[inline]
    pub fn admit_request(&mut self, request: &impl RequestView) -> Admission {
        let admission = self.admit_view(
            request,
            |identify| credential_by(identify, |header| request.header_values_named(header), || request.identity()),
            |rt| rt.honours_idempotency(request.method()),
        );
        admission.carrying(self.tollgate.units())
    }

    /// [`admit_request`](Self::admit_request) with the credential `credential` finds (the
    /// tower layer's [`TenantResolver`](crate::TenantResolver)), `honoured` telling whether the
    /// request's method honours an `Idempotency-Key` under the configuration in force.
    #[inline]
    pub(crate) fn admit_view<'a, V: RequestView>(
        &mut self,
        request: &'a V,
        credential: impl FnOnce(&Identify) -> Credential<'a>,
        honoured: impl FnOnce(&Runtime) -> bool,
    ) -> Decision {
        // Feature `otel`: the admission's span, its parent the request's trace context.
        #[cfg(feature = "otel")]
        let span = crate::base::trace::RequestSpan::start(request.method(), request.path(), |name| {
            request.header_values(name).next()
        });
        // A route may read its hold's estimate from a header: those fields go with the request.
        let mut fields: Vec<(&str, &[u8])> = Vec::new();
        let fields = &mut fields;
        let decision = self.admit_raw(
            move |rt| {
                for name in rt.hold_headers.iter() {
                    fields.extend(request.header_values_named(name).map(|v| (name.as_str(), v)));
                }
                let fields: &Vec<_> = fields;
                let info = RequestInfo::new(request.method(), request.path(), credential(&rt.config.identify))
                    .with_headers(fields);
                describe(info, request.query(), honoured(rt), || request.header_values_named(&IDEMPOTENCY_KEY))
            },
            |rt| rt.client_ip(request.client_addr(), |name| request.header_values(name)),
        );
        #[cfg(feature = "otel")]
        let decision = traced(decision, span);
        decision
    }

    /// Decides on a request without waiting, described by `describe` against the configured
    /// way of identifying tenants. An `Idempotency-Key` on a method that does not honour it is
    /// ignored. Most requests of known tenants are decided here; the rest come back as
    /// [`Admission::Pending`], for [`Tollgate::resolve`].
    #[inline]
    pub fn admit_with<'a>(&mut self, describe: impl FnOnce(&Identify) -> RequestInfo<'a>) -> Admission {
        let admission = self.admit_raw(
            |rt| {
                let mut req = describe(&rt.config.identify);
                if req.idempotency_key.is_some() && !rt.honours_idempotency(req.method) {
                    req.idempotency_key = None;
                }
                Ok(req)
            },
            |_| None,
        );
        admission.carrying(self.tollgate.units())
    }
}

/// The answer to a replay ([`Ticket::is_replay`](crate::engine::Ticket::is_replay)): the stored
/// response, marked `Idempotent-Replayed: true`, with this request's rate-limit header fields.
/// Not a replay: an empty 500 (never sent by the doors, which ask first).
#[must_use]
pub fn replay_response(ticket: &crate::engine::Ticket) -> http::Response<bytes::Bytes> {
    ticket.pass().replay_response()
}

impl Pass {
    /// [`replay_response`] of an admitted request.
    pub(crate) fn replay_response(&self) -> http::Response<bytes::Bytes> {
        let ticket = self;
        let Some(stored) = ticket.replayed_response() else {
            let mut response = http::Response::new(bytes::Bytes::new());
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            return response;
        };
        let mut response = http::Response::new(stored.body.clone());
        *response.status_mut() = http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
        let headers = response.headers_mut();
        for (name, value) in &stored.headers {
            if let (Ok(name), Ok(value)) =
                (http::HeaderName::try_from(name.as_str()), http::HeaderValue::from_bytes(value))
            {
                headers.append(name, value);
            }
        }
        headers.insert(IDEMPOTENT_REPLAYED.clone(), http::HeaderValue::from_static("true"));
        ticket.emit(&mut |field, value| put_header(headers, field, value));
        response
    }
}

/// A decision told to its span (feature `otel`): ended with it, or handed on with a pending
/// one, which [`Tollgate::resolve`](crate::Tollgate::resolve) ends.
#[cfg(feature = "otel")]
fn traced(decision: Decision, span: crate::base::trace::RequestSpan) -> Decision {
    match decision {
        Decision::Admitted(pass) => {
            pass.trace(span);
            Decision::Admitted(pass)
        }
        Decision::Rejected(rejection) => {
            rejection.trace(span);
            Decision::Rejected(rejection)
        }
        Decision::Pending(mut pending) => {
            pending.trace = Some(Box::new(span));
            Decision::Pending(pending)
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::{values_of, HeaderValues, SCAN_UP_TO};

    /// Whether a map is scanned or hashed, [`values_of`] gives the values of the name in the
    /// order they were added, and what `get_all` gives: none of another name (standard names
    /// and custom ones, one of the same length as `x-api-key` and one a prefix of it, names
    /// repeated), for a custom and a standard wanted name, the wanted values together or
    /// between others.
    #[test]
    fn values_of_gives_what_the_maps_lookup_gives() {
        let others = ["host", "x-api-kez", "accept", "x-api-ke", "user-agent", "x-request-id"];
        for wanted in [HeaderName::from_static("x-api-key"), http::header::AUTHORIZATION] {
            for total in 0..=SCAN_UP_TO + 4 {
                for copies in 0..=3usize.min(total) {
                    for first in 0..=total - copies {
                        for spread in [1, 2] {
                            let mut map = HeaderMap::new();
                            let mut added = Vec::new();
                            for i in 0..total {
                                let is_wanted = added.len() < copies && i >= first && (i - first) % spread == 0;
                                if is_wanted {
                                    added.push(format!("key{i}"));
                                    map.append(wanted.clone(), HeaderValue::from_str(&format!("key{i}")).unwrap());
                                } else {
                                    // From a few names, so that other names repeat within the
                                    // scan's size too.
                                    let name = HeaderName::from_static(others[i % 4 + (i / 4) % 3]);
                                    map.append(name, HeaderValue::from_str(&format!("v{i}")).unwrap());
                                }
                            }
                            let found = values_of(&map, &wanted);
                            assert_eq!(
                                matches!(found, HeaderValues::Scan { .. }),
                                map.len() <= SCAN_UP_TO,
                                "{total} values: scanned up to SCAN_UP_TO, hashed past it"
                            );
                            let got: Vec<&[u8]> = found.collect();
                            let what =
                                format!("{wanted}: {total} values, {copies} wanted from {first}, every {spread}");
                            let added: Vec<&[u8]> = added.iter().map(String::as_bytes).collect();
                            assert_eq!(got, added, "{what}");
                            let by_hash: Vec<&[u8]> = map.get_all(&wanted).iter().map(HeaderValue::as_bytes).collect();
                            assert_eq!(got, by_hash, "{what}");
                        }
                    }
                }
            }
        }
    }

    /// The order is the order the values were added, also when other names come between
    /// them: what a hold's estimate and `If-None-Match` read.
    #[test]
    fn values_of_keeps_the_order_values_were_added() {
        let wanted = HeaderName::from_static("x-api-key");
        let mut map = HeaderMap::new();
        map.append(wanted.clone(), HeaderValue::from_static("first"));
        map.append(http::header::HOST, HeaderValue::from_static("a"));
        map.append(http::header::HOST, HeaderValue::from_static("b"));
        map.append(wanted.clone(), HeaderValue::from_static("second"));
        map.append(http::header::ACCEPT, HeaderValue::from_static("c"));
        map.append(wanted.clone(), HeaderValue::from_static("third"));
        assert!(map.len() <= SCAN_UP_TO);
        let got: Vec<&[u8]> = values_of(&map, &wanted).collect();
        assert_eq!(got, [&b"first"[..], b"second", b"third"]);
    }
}
