//! A request as its front door described it, on its way in: refused before its tenant is
//! known (the node stopping, a malformed key or path), routed, its hold's estimate read, its
//! tenant found in the table (decided at once) or looked up in the directory (pending).

use crate::engine::table::{Lookup, ANONYMOUS};
use std::sync::Arc;

use crate::engine::admit::{
    gate::Gate,
    idempotency::{check_key, Idempotency},
    stage::{scoped_key, Decision, OwnedCredential, PendingAdmission, PendingKey, RequestInfo, Stage},
};
use crate::{
    config::TenantId,
    plan::{RouteCost, Runtime},
    response::{Rejection, RejectionKind},
    tenant::{check_api_key, Credential},
};

/// Who a request is, as [`Gate::identify`] found it: known to the table, or to look up.
pub(crate) enum Identified {
    /// A tenant the table holds.
    Known(crate::tenant::Tenant),
    /// To look up in the directory: the credential, and its client address's key (0: none).
    Lookup(OwnedCredential, u64),
}

impl Gate {
    /// Decides on a request described against `rt`, whose `idempotency_key` is only set on
    /// methods that honour it.
    #[inline]
    pub(crate) fn admit_in(
        &self,
        rt: &Runtime,
        req: &RequestInfo<'_>,
        client: impl FnOnce() -> Option<crate::tenant::Client>,
    ) -> Decision {
        if self.shared.stopping().load(std::sync::atomic::Ordering::Relaxed) {
            return self.reject(
                Rejection::new(RejectionKind::StoreUnavailable, "the server is stopping; send the request again")
                    .with_retry_after(1),
            );
        }
        if let Some(key) = req.idempotency_key {
            if let Err(why) = check_key(key) {
                return self.reject(Rejection::new(RejectionKind::MalformedIdempotencyKey, why));
            }
        }
        let lookup = match Self::lookup_of(rt, req.credential, rt.anonymous.is_some()) {
            Ok(lookup) => lookup,
            Err(rejection) => return self.reject(rejection),
        };
        // The path as the routers match it: rules are matched, and idempotent requests told
        // apart, on what the application serves.
        let path = match crate::config::normalize_path(req.path) {
            Ok(path) => path,
            Err(why) => {
                // A malformed key is answered first, as when it was checked before the path.
                if let Lookup::ApiKey(key) = lookup {
                    if check_api_key(key).is_err() {
                        return self.malformed_key(key);
                    }
                }
                return self.reject(Rejection::new(RejectionKind::MalformedPath, why));
            }
        };
        let route = rt.route(req.method, &path);
        if route.hold != 0 {
            return self.admit_holding(rt, req, lookup, route, &path, client);
        }
        self.admit_routed(rt, req, lookup, route, &path, client)
    }

    /// [`admit_in`](Self::admit_in) on a route that holds: its estimate is read before
    /// anything is taken (a bad one is refused, nothing charged), and the hold taken once the
    /// request is admitted.
    #[cold]
    #[inline(never)]
    fn admit_holding(
        &self,
        rt: &Runtime,
        req: &RequestInfo<'_>,
        lookup: Lookup<'_>,
        route: RouteCost,
        path: &str,
        client: impl FnOnce() -> Option<crate::tenant::Client>,
    ) -> Decision {
        let spec = &rt.holds[usize::from(route.hold) - 1];
        let asked = Self::hold_estimate(spec, req.headers)
            .and_then(|units| Ok((units, Self::hold_values(rt, spec, req.headers, path)?)));
        match asked {
            Ok((units, values)) => {
                Self::holding(self.admit_routed(rt, req, lookup, route, path, client), spec.clone(), units, values)
            }
            Err(r) => self.reject(r),
        }
    }

    /// [`admit_in`](Self::admit_in) once the route is known.
    #[inline(always)]
    fn admit_routed(
        &self,
        rt: &Runtime,
        req: &RequestInfo<'_>,
        lookup: Lookup<'_>,
        mut route: RouteCost,
        path: &str,
        client: impl FnOnce() -> Option<crate::tenant::Client>,
    ) -> Decision {
        let idem = req.idempotency_key.map(|k| (k, Idempotency::request(req.method, path, req.query)));
        match self.table.get(lookup) {
            Some(state) => {
                // A state of the configuration before a reload, met in the moment before its
                // eviction: its plan indexes meters its own way.
                let mut route = if Arc::ptr_eq(&state.plan.meters, &rt.meters) {
                    route
                } else {
                    rt.meters.remap(route, &state.plan.meters)
                };
                let anonymous = || rt.anonymous.is_some() && state.id.as_str() == crate::config::ANONYMOUS_TENANT;
                if state.plan.clients.is_some() || (idem.is_some() && anonymous()) {
                    // The anonymous tenant: its rate is per client address, and so are its
                    // `Idempotency-Key`s (client B's key `1` is not client A's).
                    let ip = req.client.map(crate::tenant::Client::given).or_else(client).map(|c| c.ip);
                    route.client = rt.client_keys.as_ref().map_or(0, |k| k.key(ip));
                    if let (Some((key, request)), Some(keys), true) = (idem, &rt.client_keys, anonymous()) {
                        // Without its address an anonymous caller cannot be told from the
                        // others: its key is not honoured (a stored response is never
                        // answered to another client).
                        let Some(ip) = ip else { return self.decide(state, route, None) };
                        let scoped = scoped_key(key, keys, Some(ip));
                        return self.decide(state, route, Some((&scoped, request)));
                    }
                }
                self.decide(state, route, idem)
            }
            None => {
                if let Lookup::ApiKey(key) = lookup {
                    if check_api_key(key).is_err() {
                        return self.malformed_key(key);
                    }
                }
                // Anonymous callers (or an unknown key served as one) need their address.
                let who = req.client.map(crate::tenant::Client::given).or_else(client);
                let ip = who.map(|c| c.ip);
                if let Some(keys) = &rt.client_keys {
                    route.client = keys.key(ip);
                }
                // Its lookups of API keys are limited per address only when the address is the
                // client's own; else they share the node's budget.
                let identified = who.is_some_and(|c| c.identifies);
                let credential = match lookup {
                    Lookup::ApiKey(k) => OwnedCredential::ApiKey(k.into()),
                    Lookup::Identity(ANONYMOUS) => OwnedCredential::Anonymous,
                    Lookup::Identity(t) => OwnedCredential::Tenant(t.into()),
                };
                let idempotency = idem.map(|(key, request)| {
                    let scoped = rt.client_keys.as_ref().and_then(|keys| Some(scoped_key(key, keys, Some(ip?)).into()));
                    Box::new(PendingKey { key: key.into(), request, scoped })
                });
                Decision::Pending(PendingAdmission {
                    stage: Stage::Resolve { credential, meters: rt.meters.clone(), identified },
                    route,
                    rt: None,
                    idempotency,
                    hold: None,
                    #[cfg(feature = "otel")]
                    trace: None,
                })
            }
        }
    }

    /// How the table and the directory find the tenant of `credential`, or its refusal: an
    /// empty or overlong key, an identity outside the tenant id grammar, a malformed
    /// credential, or none (401 with the challenge, unless `anonymous` callers are served).
    #[inline(always)]
    fn lookup_of<'a>(rt: &Runtime, credential: Credential<'a>, anonymous: bool) -> Result<Lookup<'a>, Rejection> {
        match credential {
            Credential::ApiKey(key) => {
                // Its length bounds the digest's work; its characters are checked only when
                // the table does not hold it: a key reaches the table only through the
                // directory's lookup, which checks it first, and a match of the 128-bit keyed
                // digest stands for the key.
                if key.is_empty() || key.len() > crate::base::MAX_KEY_LEN {
                    return Err(Self::malformed_key_rejection(key));
                }
                Ok(Lookup::ApiKey(key))
            }
            Credential::Tenant(id) => {
                if !TenantId::is_valid(id) {
                    return Err(Rejection::new(
                        RejectionKind::MalformedCredentials,
                        "a tenant identity is 1 to 128 visible ASCII characters",
                    ));
                }
                Ok(Lookup::Identity(id))
            }
            Credential::Missing if anonymous => Ok(Lookup::Identity(ANONYMOUS)),
            Credential::Missing => {
                Err(Self::challenged(rt, RejectionKind::MissingCredentials, "the request does not identify its tenant"))
            }
            Credential::Malformed(why) => Err(Rejection::new(RejectionKind::MalformedCredentials, why)),
        }
    }

    /// A 401 of `kind` with the configuration's challenge (`WWW-Authenticate`).
    #[cold]
    fn challenged(rt: &Runtime, kind: RejectionKind, why: &'static str) -> Rejection {
        let mut r = Rejection::new(kind, why);
        r.inner.challenge = Some(rt.challenge.clone());
        r
    }

    /// Who sent a request, without admitting it (the tenant's own routes mounted outside the
    /// layer, such as its usage): nothing is taken, no rate cell nor unit. A tenant the table
    /// holds is known at once; another is looked up as a request's would be
    /// ([`identified`](Self::identified)), with the same negative cache and limits on unknown
    /// keys. A request without credentials is refused (401) even where anonymous callers are
    /// served: they have no usage of their own to see.
    pub(crate) fn identify(
        &self,
        rt: &Runtime,
        credential: Credential<'_>,
        client: impl FnOnce() -> Option<crate::tenant::Client>,
    ) -> Result<Identified, Rejection> {
        if self.shared.stopping().load(std::sync::atomic::Ordering::Relaxed) {
            return Err(self.count(
                Rejection::new(RejectionKind::StoreUnavailable, "the server is stopping; send the request again")
                    .with_retry_after(1),
            ));
        }
        let lookup = Self::lookup_of(rt, credential, false).map_err(|r| self.count(r))?;
        if let Some(state) = self.table.get(lookup) {
            return Ok(Identified::Known(state));
        }
        let credential = match lookup {
            Lookup::ApiKey(key) => {
                if check_api_key(key).is_err() {
                    return Err(self.count(Self::malformed_key_rejection(key)));
                }
                OwnedCredential::ApiKey(key.into())
            }
            Lookup::Identity(t) => OwnedCredential::Tenant(t.into()),
        };
        // Lookups of unknown keys are limited per client address when it is the client's own,
        // as a request's are (else the node's shared budget).
        let address = match (client(), &rt.client_keys) {
            (Some(c), Some(keys)) if c.identifies => keys.key(Some(c.ip)),
            _ => 0,
        };
        Ok(Identified::Lookup(credential, address))
    }

    /// The tenant [`identify`](Self::identify) found, or looked up in the directory: never the
    /// anonymous tenant (an unknown key served as it is refused as unknown, 401; a directory
    /// that does not answer is 503, never the anonymous plan's failing open).
    pub(crate) async fn identified(&self, who: Identified) -> Result<crate::tenant::Tenant, Rejection> {
        let state = match who {
            Identified::Known(state) => state,
            Identified::Lookup(credential, address) => {
                self.lookup_serving(credential, address, false).await.map_err(|r| self.count(r))?
            }
        };
        let rt = self.shared.runtime().load();
        if rt.anonymous.is_some() && state.id.as_str() == crate::config::ANONYMOUS_TENANT {
            return Err(self.count(Self::challenged(
                &rt,
                RejectionKind::UnknownCredentials,
                "the credential does not match any tenant",
            )));
        }
        Ok(state)
    }

    /// The dimension values of a route's hold (`hold_values`), written or read from the
    /// request's headers or its path (`path`, as the routes matched it), checked against the held meter's lists before anything is taken: a
    /// value a list lacks, a header missing or sent twice, is refused 400 (`InvalidDimension`)
    /// unless the meter counts it under `other`.
    fn hold_values(
        rt: &Runtime,
        hold: &crate::config::RouteHold,
        headers: &[(&str, &[u8])],
        path: &str,
    ) -> Result<crate::engine::admit::stage::HoldValues, Rejection> {
        if hold.values.is_empty() {
            return Ok(Vec::new());
        }
        let refuse = |why: String| {
            let mut r = Rejection::new(RejectionKind::InvalidDimension, format!("meter `{}`: {why}", hold.meter));
            r.inner.policy = Some(hold.meter.to_string());
            r
        };
        let mut values = Vec::with_capacity(hold.values.len());
        for (name, source) in &hold.values {
            match source {
                crate::config::ValueSource::Value(v) => values.push((name.clone(), v.clone())),
                crate::config::ValueSource::Header(header) => {
                    let mut sent = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(header.as_str()));
                    match (sent.next(), sent.next()) {
                        (None, _) => {}
                        (Some((_, v)), None) => match std::str::from_utf8(v) {
                            Ok(v) => values.push((name.clone(), v.trim().into())),
                            Err(_) => return Err(refuse(format!("the `{header}` header is not text"))),
                        },
                        (Some(_), Some(_)) => return Err(refuse(format!("the `{header}` header is sent twice"))),
                    }
                }
                // The route matched, so the segment is there (counted as the pattern counts
                // them: past a leading `/`, which `RoutePattern::matches` does not require).
                crate::config::ValueSource::Path { segment, .. } => {
                    let mut segments = path.strip_prefix('/').unwrap_or(path).split('/');
                    if let Some(v) = segments.nth(*segment).filter(|v| !v.is_empty()) {
                        values.push((name.clone(), v.into()));
                    }
                }
            }
        }
        let meter = rt.meters.index(hold.meter.as_str()).unwrap_or(0);
        rt.meters.series(meter, &values).map_err(|e| refuse(e.to_string()))?;
        Ok(values)
    }

    /// The units a route's hold holds for a request: its estimate, or read from the header
    /// it names (its `default` without one; refused, 400, when it does not parse, is zero or
    /// is above its `max`).
    fn hold_estimate(hold: &crate::config::RouteHold, headers: &[(&str, &[u8])]) -> Result<u64, Rejection> {
        match &hold.estimate {
            crate::config::HoldEstimate::Units(n) => Ok(*n),
            crate::config::HoldEstimate::Header { header, default, max } => {
                let mut values = headers.iter().filter(|(name, _)| name.eq_ignore_ascii_case(header.as_str()));
                let parsed = match (values.next(), values.next()) {
                    (None, _) => return Ok(*default),
                    // Repeated: no one estimate.
                    (Some(_), Some(_)) => None,
                    (Some((_, value)), None) => std::str::from_utf8(value)
                        .ok()
                        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse::<u64>().ok()),
                };
                match parsed {
                    Some(n) if n >= 1 && n <= *max => Ok(n),
                    _ => Err(Rejection::new(
                        RejectionKind::MalformedHoldEstimate,
                        format!(
                            "the `{header}` header must be sent once, a whole number of {} units from 1 to {max}",
                            hold.meter
                        ),
                    )),
                }
            }
        }
    }

    /// `admission` of a request on a route that holds `units`: a charged request admitted
    /// waits for its hold ([`Stage::Hold`](crate::engine::admit::stage::Stage::Hold), in
    /// [`resolve`](Gate::resolve)); a replay holds nothing.
    #[cold]
    #[inline(never)]
    fn holding(
        admission: Decision,
        spec: Arc<crate::config::RouteHold>,
        units: u64,
        values: crate::engine::admit::stage::HoldValues,
    ) -> Decision {
        match admission {
            Decision::Pending(mut p) => {
                p.hold = Some((spec, units, values));
                Decision::Pending(p)
            }
            done => done,
        }
    }

    /// The 400 of an API key that cannot be one (empty, too long, characters other than
    /// visible ASCII, a comma).
    #[cold]
    #[inline(never)]
    fn malformed_key(&self, key: &[u8]) -> Decision {
        self.reject(Self::malformed_key_rejection(key))
    }

    /// The refusal of an API key that cannot be one.
    #[cold]
    #[inline(never)]
    fn malformed_key_rejection(key: &[u8]) -> Rejection {
        let why = check_api_key(key).err().unwrap_or("the API key is malformed");
        // A comma: a repeated header a proxy joined; answered as a repeated one.
        let why = if why == crate::tenant::COMMA_IN_KEY { crate::response::REPEATED_KEY } else { why };
        Rejection::new(RejectionKind::MalformedCredentials, why)
    }
}
