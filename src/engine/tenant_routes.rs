//! The routes an application mounts for its tenants: behind tollgate's layer, their own spend
//! cap ([`Tollgate::tenant_spend_cap`]), recharge ([`Tollgate::tenant_recharge`]) and alert
//! endpoint ([`Tollgate::tenant_alert_endpoint`]); outside it, their own usage
//! ([`Tollgate::tenant_usage`]), which identifies its caller without charging it. Their rules
//! are a tenant's settings (`settings/caps.rs`, `settings/recharge.rs`,
//! `settings/endpoint.rs`) and the usage part's views (`usage/views.rs`); their answers,
//! problem+json refusals included, are this file's over `response::route`'s.

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::engine::{
    door::{credential_by, RequestView},
    usage::views::{NoView, UsageView},
    TenantContext, Tollgate,
};
use crate::response::route::{json, no_content, not_get, not_get_put_delete, problem, too_large};
use crate::settings::{
    caps::{self, CapError},
    endpoint::{self, EndpointError, TenantEndpoint},
    recharge::{self as settings, RechargeError},
    scopes::{self, Need, ScopeError},
};
use crate::{
    base::KeyScope,
    store::{Actor, Setting},
    tenant::Caller,
};

/// `If-None-Match` as RFC 9110 reads it: `*`, or a list of entity tags compared weakly.
fn none_match(values: &[u8], etag: &str) -> bool {
    let Ok(values) = std::str::from_utf8(values) else { return false };
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    values.split(',').any(|t| t.trim() == "*" || strip(t) == strip(etag))
}

impl Tollgate {
    /// Who calls one of the tenant routes (behind the layer: [`tenant_spend_cap`](Self::tenant_spend_cap),
    /// [`tenant_recharge`](Self::tenant_recharge), [`tenant_alert_endpoint`](Self::tenant_alert_endpoint)),
    /// read from the request as the layer identifies it (`[identify]`): the API key it carries,
    /// or the [`Identity`](crate::Identity) an authentication layer put in it. What it may do
    /// there is its key's scopes ([`KeyScopes`](crate::store::KeyScopes)). The door crates'
    /// routes call it; an application calling the verbs itself does too. It reads the request
    /// as `[identify]` says, as the layer's default resolver does: behind a layer given a
    /// resolver of your own ([`TollgateLayer::resolver`](crate::TollgateLayer::resolver)), make
    /// the caller from what your resolver read ([`Caller::api_key`], [`Caller::identity`]).
    ///
    /// ```
    /// let config = tollgate::Config::from_toml_str("[plans.free]\nrate = \"5/s\"").unwrap();
    /// let (tollgate, _worker) = tollgate::Tollgate::builder(config).build();
    /// let request = http::Request::get("/v1/spend/cap").header("x-api-key", "tg_acme").body(()).unwrap();
    /// assert_eq!(tollgate.caller(&request), tollgate::Caller::api_key(b"tg_acme"));
    /// ```
    #[must_use]
    pub fn caller(&self, request: &impl RequestView) -> Caller {
        let rt = self.shared().runtime().load();
        match credential_by(&rt.config.identify, |h| request.header_values_named(h), || request.identity()) {
            crate::tenant::Credential::ApiKey(key) => Caller::api_key(key),
            crate::tenant::Credential::Tenant(_) => request.identity().map_or_else(Caller::nobody, Caller::identity),
            _ => Caller::nobody(),
        }
    }

    /// Whether `caller` may read (`GET`) or change (`PUT`, `DELETE`) `thing` at `tenant`'s
    /// own route, which `scope` writes: who it is as a setting records it, or the refusal to
    /// answer. Any other method is the route's to refuse (405).
    async fn allowed(
        &self,
        tenant: &crate::base::TenantId,
        caller: &Caller,
        method: &Method,
        scope: KeyScope,
        thing: &'static str,
    ) -> Result<String, http::Response<Bytes>> {
        if ![Method::GET, Method::PUT, Method::DELETE].contains(method) {
            return Ok(String::new());
        }
        let need = Need { scope, write: *method != Method::GET, thing };
        let config = self.shared().runtime().load().config.clone();
        let directory = &self.shared().stores().background().directory;
        let now = self.shared().clock().unix_secs();
        scopes::check(directory.as_ref(), &config, tenant, caller, need, now).await.map_err(|e| scope_problem(&e))
    }

    /// Records a change of `tenant`'s `setting` by `actor` in the audit (the directory's
    /// store), if its values differ: after the change was written.
    pub(crate) async fn record_change(
        &self,
        tenant: &crate::base::TenantId,
        actor: Actor,
        setting: Setting,
        before: Option<String>,
        after: Option<String>,
    ) {
        if before == after {
            return;
        }
        let at = self.shared().clock().unix_nanos() / 1_000_000;
        let record = crate::store::AuditRecord::new(tenant.clone(), at, actor, setting, before, after);
        crate::store::append_audit(self.shared().stores().background().audit.as_ref(), &record).await;
    }

    /// The route an application mounts for its tenants' own spend cap, behind tollgate's
    /// layer (the calling tenant's cap; `caller`, [`Tollgate::caller`] of the request, needs the
    /// scope `caps:write` to set it, `usage:read` or `caps:write` to read it): `GET` answers the
    /// cap in force (`{"currency", "limit", "mode", "max_limit", "plan_limit", "set_by"}`,
    /// amounts as decimal strings of the currency), `PUT` with `{"limit": "25.00", "mode":
    /// "hard"}` (`mode` optional: the plan's) sets the tenant's own, at most the plan's
    /// `spend.max_limit` (or the operator's override), and answers the same; `DELETE` removes
    /// it (the plan's holds again; 204). Every node holds reservations to it from its next
    /// call to the store (a raised cap is seen within a second; a lowered one lets through at
    /// most the spend leases nodes hold already). A refusal is a problem+json 4xx (403 when
    /// the plan has no spend cap, 422 above the maximum, 400 for a body that is not that JSON
    /// or a limit that is not an amount; 403 `scope-missing` for a key without the scope,
    /// `key-not-live` for one that is not the tenant's live key; 503 when the directory does
    /// not answer) and stores nothing. The door crates mount it (`tollgate_axum::spend_cap`,
    /// `tollgate_actix::spend_cap`).
    pub async fn tenant_spend_cap(
        &self,
        tenant: &TenantContext,
        caller: &Caller,
        method: &Method,
        body: &[u8],
    ) -> http::Response<Bytes> {
        let config = self.shared().runtime().load().config.clone();
        let stores = self.shared().stores().background();
        let now = self.shared().clock().unix_secs();
        let id = tenant.tenant();
        // Who may, before what is asked is read.
        let who = match self.allowed(id, caller, method, KeyScope::CapsWrite, "the spend cap").await {
            Ok(who) => who,
            Err(refused) => return refused,
        };
        let act = match *method {
            Method::GET => caps::CapAct::Read,
            Method::PUT => {
                if body.len() > caps::MAX_BODY {
                    return too_large("1 KiB");
                }
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Put {
                    limit: String,
                    mode: Option<String>,
                }
                let bad = || {
                    problem(
                        StatusCode::BAD_REQUEST,
                        "bad-request",
                        "Bad request",
                        "expected {\"limit\": \"25.00\", \"mode\": \"hard\" | \"soft\"}",
                    )
                };
                let Ok(put) = serde_json::from_slice::<Put>(body) else { return bad() };
                let hard = match put.mode.as_deref() {
                    Some("hard") => Some(true),
                    Some("soft") => Some(false),
                    // The mode of the plan's cap (with the tenant's overrides).
                    None => None,
                    Some(_) => return bad(),
                };
                match caps::parse(&put.limit, hard.unwrap_or(true)) {
                    Ok(cap) if hard.is_some() => caps::CapAct::Set(cap),
                    Ok(cap) => caps::CapAct::SetInPlanMode(cap.limit),
                    Err(e) => return cap_problem(&e),
                }
            }
            Method::DELETE => caps::CapAct::Remove,
            _ => return not_get_put_delete(),
        };

        let removing = act == caps::CapAct::Remove;
        let before = match act {
            caps::CapAct::Read => None,
            _ => Some(
                caps::spend_cap(stores.quota.as_ref(), stores.directory.as_ref(), &config, id, caps::CapAct::Read, now)
                    .await,
            ),
        };
        let answer = caps::spend_cap(stores.quota.as_ref(), stores.directory.as_ref(), &config, id, act, now).await;
        if let (Ok(view), Some(before)) = (&answer, before) {
            let before = crate::settings::before_text(before, |v| crate::settings::cap_text(v.own));
            let after = crate::settings::cap_text(view.own);
            self.record_change(id, crate::settings::route_actor(&who), Setting::SpendCap, before, after).await;
        }
        if let (Ok(view), false) = (&answer, act == caps::CapAct::Read) {
            // This node knows at once (others at their next call to the store).
            if let Some(state) = self.gate().table().state(id) {
                if let Some(cell) = state.plan.spend.and_then(|s| state.quota(s)) {
                    cell.cap_changed(view.own);
                }
            }
        }
        match answer {
            Ok(_) if removing => no_content(),
            Ok(view) => json(StatusCode::OK, &view.to_json()),
            Err(e) => cap_problem(&e),
        }
    }

    /// The route an application mounts for its tenants' own usage, **outside** tollgate's
    /// layer, so that reading it spends no quota unit nor rate cell: `GET` (or `HEAD`) answers
    /// the calling tenant's plan, quotas (used, held, limit, remaining, period start and
    /// reset), balances (grants with their expiry, refunds, takes and closures; recharge
    /// settings), spend cap and spending, and usage per meter in the current and previous
    /// billing period with a daily series, as JSON of docs/usage.schema.json (`version` 1).
    ///
    /// The caller is identified as the layer identifies a request (`[identify]`: the API key
    /// header or an [`Identity`](crate::Identity) in the request), through the same
    /// table, negative cache and limits on unknown keys, and the answer is only ever its own
    /// tenant's. Refusals are the layer's problem+json: 401 without a credential (even where
    /// anonymous callers are served) or with an unknown one, 400 for a malformed one, 405
    /// for a method other than `GET` and `HEAD` (`Allow: GET, HEAD`), 503 when the store does
    /// not answer; 403 `scope-missing` for a key without the scope `usage:read` (every key's
    /// by default, [`KeyScopes`](crate::store::KeyScopes)), 403 `key-not-live` (`Retry-After:
    /// 1`) for one that is not among the tenant's live keys as the view read them (revoked
    /// since the node confirmed it, or issued within the last second).
    ///
    /// A quota's `used`, `held`, `remaining` and `limit` come from one read of the store, so
    /// that `used + held + remaining` is at most `limit` on whichever node answers; the
    /// `RateLimit` header says what this node last heard, and may differ by what other nodes
    /// took since (docs/usage.md, "The same numbers as enforcement"). The view is made at most once per tenant per second on a node
    /// ([`Stats::usage_refreshes`](crate::report::Stats::usage_refreshes)), however often it is
    /// polled, with a bounded number of store calls (docs/usage.md); answers carry
    /// `Cache-Control: private, max-age=1` and an `ETag`, and an `If-None-Match` that matches
    /// the view kept is answered 304 without reading anything. The door crates mount it
    /// (`tollgate_axum::usage`, `tollgate_actix::usage`, `tollgate_lambda::usage_handler`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let config = tollgate::Config::from_toml_str(
    ///     "[plans.free]\nrate = \"5/s\"\nquotas.requests = { limit = 100, period = \"day\" }\n\
    ///      [tenants.acme]\nplan = \"free\"\nkeys = [\"tg_acme\"]",
    /// ).unwrap();
    /// let (tollgate, _worker) = tollgate::Tollgate::builder(config).build();
    /// let request = http::Request::get("/v1/usage").header("x-api-key", "tg_acme").body(()).unwrap();
    /// let response = tollgate.tenant_usage(&request).await;
    /// assert_eq!(response.status(), 200);
    /// let usage: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
    /// assert_eq!(usage["quotas"][0]["remaining"], 100);
    /// # }
    /// ```
    pub fn tenant_usage(
        &self,
        request: &impl RequestView,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<Bytes>> + Send + 'static>> {
        let engine = self.clone();
        let head = request.method_is(&Method::HEAD);
        let get = head || request.method_is(&Method::GET);
        let rt = self.shared().runtime().load_full();
        let vary = match &rt.config.identify {
            crate::config::Identify::ApiKey { header } => Some(header.clone()),
            crate::config::Identify::Extension => None,
        };
        let caller = self.caller(request);
        let keyed = vary.is_some();
        let who = get.then(|| {
            let credential =
                credential_by(&rt.config.identify, |h| request.header_values_named(h), || request.identity());
            self.gate()
                .identify(&rt, credential, || rt.client_ip(request.client_addr(), |name| request.header_values(name)))
        });
        drop(rt);
        let if_none_match: Option<Vec<u8>> = {
            let mut values = request.header_values_named(&http::header::IF_NONE_MATCH).peekable();
            values.peek().is_some().then(|| values.collect::<Vec<_>>().join(&b","[..]))
        };
        Box::pin(async move {
            let Some(who) = who else { return not_get() };
            let refused = |r| crate::response::respond(&crate::response::ProblemJson, r);
            let who = match who {
                Ok(who) => who,
                Err(r) => return refused(r),
            };
            let state = match engine.gate().identified(who).await {
                Ok(state) => state,
                Err(r) => return refused(r),
            };
            // A caller without a key needs no view to be told what it may do.
            if !caller.is_key() {
                if let Err(e) = scopes::check_among(&[], &state.id, &caller, USAGE) {
                    return usage_refused(&e);
                }
            }
            let views = engine.units().views();
            let clock = engine.shared().clock();
            let matches = |etag: &str| if_none_match.as_deref().is_some_and(|v| none_match(v, etag));
            // A view kept that the client has: nothing to read nor send.
            let kept = if_none_match.as_ref().and_then(|_| views.fresh(&state.id, clock.unix_nanos()));
            let view = match kept {
                Some(view) if matches(&view.etag) => view,
                _ => {
                    let made = views
                        .view(
                            &state.id,
                            || clock.unix_nanos(),
                            engine.shared().runtime().load().config.usage.view_refresh_rate,
                            &engine.shared().totals().usage_refreshes_refused,
                            || async {
                                engine.shared().totals().usage_refreshes.add(1);
                                let views = engine.units().views();
                                let (body, numbers, history) =
                                    engine.usage_body(&state, views.history(&state.id)).await?;
                                views.keep_history(&state.id, history);
                                // Who may read it: the scopes of the tenant's keys, read with it.
                                let keys = if keyed {
                                    let config = engine.shared().runtime().load().config.clone();
                                    // As the view's other reads: the request path's, never
                                    // feeding its breaker.
                                    let directory = &engine.shared().stores().request().directory;
                                    let now = clock.unix_secs();
                                    crate::store::limited::reading(scopes::keys_of(
                                        directory.as_ref(),
                                        &config,
                                        &state.id,
                                        now,
                                    ))
                                    .await?
                                } else {
                                    Box::default()
                                };
                                Ok::<_, crate::store::StoreError>(UsageView::new(body, &numbers, keys))
                            },
                        )
                        .await;
                    match made {
                        Ok(view) => view,
                        Err(NoView::OverBudget) => return refused(over_budget()),
                        Err(e) => {
                            if let NoView::Failed(e) = e {
                                tracing::debug!(tenant = %state.id, "usage view not made: {e}");
                            }
                            // The layer's refusal of a store that did not answer.
                            return refused(
                                crate::response::Rejection::new(
                                    crate::response::RejectionKind::StoreUnavailable,
                                    "the store did not answer; try again",
                                )
                                .with_retry_after(1),
                            );
                        }
                    }
                }
            };
            if let Err(e) = scopes::check_among(&view.keys, &state.id, &caller, USAGE) {
                // A view kept past its second (the node's budget spent) knows the keys of when
                // it was made: a key issued since is told to come back, not refused.
                let stale = clock.unix_nanos().saturating_sub(view.made_at) >= crate::engine::usage::views::FRESH_NANOS;
                if stale && matches!(e, scopes::ScopeError::NotLive(_)) {
                    return refused(over_budget());
                }
                return usage_refused(&e);
            }
            let mut response = if matches(&view.etag) {
                let mut r = http::Response::new(Bytes::new());
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            } else {
                let mut r = http::Response::new(if head { Bytes::new() } else { view.body.clone() });
                r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                r
            };
            let headers = response.headers_mut();
            headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("private, max-age=1"));
            // The answer depends on the credential: a cache keeps one per key.
            if let Some(name) = vary {
                headers.insert(http::header::VARY, http::HeaderValue::from(name));
            }
            if let Ok(etag) = http::HeaderValue::from_str(&view.etag) {
                headers.insert(http::header::ETAG, etag);
            }
            response
        })
    }

    /// The route an application mounts for its tenants' own auto-recharge, behind tollgate's
    /// layer (the calling tenant's; `caller`, [`Tollgate::caller`] of the request, needs the
    /// scope `recharge:write` to change it, which no key has unless given it by name, and
    /// `usage:read` or `recharge:write` to read it; the setting records which key set it):
    /// `GET` answers its recharge (`{"meter", "currency", "on", "off_reason", "settings", "plan", "failures",
    /// "open", "month"}`, money as decimal strings of the currency), `PUT` with `{"below":
    /// 10000, "to": 50000, "monthly_limit": "200.00"}` (each optional: the plan's; `{}` for all
    /// of the plan's; an empty body is refused) turns it on
    /// within the plan's bounds (`to` and `monthly_limit` at most the plan's, `below` under
    /// `to`) and answers the same, `DELETE` turns it off (204). Each body may name the meter
    /// (`"meter": "tokens"`); without one, the plan's one recharged meter. A refusal is a
    /// problem+json 4xx and stores nothing: 422 for values outside the bounds or not numbers
    /// (or a body that is not that JSON), 403 when the plan recharges nothing there, 503 when
    /// Stripe could not say the price's amount or the store failed, 403 `scope-missing` for a
    /// key without the scope. The door crates mount it (`tollgate_axum::recharge`,
    /// `tollgate_actix::recharge`).
    pub async fn tenant_recharge(
        &self,
        tenant: &TenantContext,
        caller: &Caller,
        method: &Method,
        body: &[u8],
    ) -> http::Response<Bytes> {
        if ![Method::GET, Method::PUT, Method::DELETE].contains(method) {
            return not_get_put_delete();
        }
        if body.len() > settings::MAX_BODY {
            return too_large("1 KiB");
        }
        // Who may, before what is asked is read.
        let who = match self.allowed(tenant.tenant(), caller, method, KeyScope::RechargeWrite, "the recharge").await {
            Ok(who) => who,
            Err(refused) => return refused,
        };
        #[derive(serde::Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Body {
            meter: Option<String>,
            below: Option<u64>,
            to: Option<u64>,
            monthly_limit: Option<String>,
        }
        let invalid =
            |why: &str| problem(StatusCode::UNPROCESSABLE_ENTITY, "recharge-invalid", "Recharge settings refused", why);
        let raw_empty = body.iter().all(u8::is_ascii_whitespace);
        let body: Body = if raw_empty {
            Body::default()
        } else {
            match serde_json::from_slice(body) {
                Ok(b) => b,
                Err(e) => {
                    return invalid(&format!(
                        "expected {{\"below\": 10000, \"to\": 50000, \"monthly_limit\": \"200.00\"}} (each \
                         optional, `meter` too): {e}"
                    ))
                }
            }
        };
        if *method != Method::PUT && (body.below.is_some() || body.to.is_some() || body.monthly_limit.is_some()) {
            return invalid("values are set with PUT");
        }
        // Turning on charges the tenant's card: never on a body that was not sent (or not read).
        if *method == Method::PUT && raw_empty {
            return invalid("a PUT needs a body: the values, or {} for the plan's");
        }
        let config = self.shared().runtime().load().config.clone();
        let meter = match body.meter {
            Some(m) => crate::base::MeterId::from(m.as_str()),
            // Recharges are not overridden: the plan's own, as the tenant is served.
            None => match config.plan(tenant.plan()).map(settings::one_recharged_meter) {
                Some(Ok(only)) => only,
                Some(Err(0)) | None => {
                    return recharge_problem(&RechargeError::NoRecharge {
                        plan: tenant.plan().to_string(),
                        meter: "any meter".into(),
                    })
                }
                Some(Err(_)) => return invalid("this plan recharges several meters: name one (\"meter\": \"…\")"),
            },
        };
        let ask = settings::RechargeAsk::new(body.below, body.to, body.monthly_limit);
        let answer = match *method {
            Method::GET => self.recharge(tenant.tenant(), &meter).await,
            Method::PUT => {
                let actor = crate::settings::route_actor(&who);
                self.set_recharge_by(tenant.tenant(), &meter, Some(ask), settings::SetBy::Tenant(who), actor).await
            }
            Method::DELETE => {
                let actor = crate::settings::route_actor(&who);
                self.set_recharge_by(tenant.tenant(), &meter, None, settings::SetBy::Tenant(who), actor).await
            }
            _ => return not_get_put_delete(),
        };
        match answer {
            Ok(_) if *method == Method::DELETE => no_content(),
            Ok(view) => json(StatusCode::OK, &view.to_json()),
            Err(e) => recharge_problem(&e),
        }
    }

    /// The route an application mounts for its tenants' own alert endpoint, behind tollgate's
    /// layer (the calling tenant is the one it sets; `caller`, [`Tollgate::caller`] of the
    /// request, needs the scope `alerts:write` to set it, `usage:read` or `alerts:write` to
    /// read it): `GET` answers
    /// `{"url": …}` (404 without one), `PUT` with `{"url": "https://…"}` registers it and
    /// answers `{"url": …, "secret": "whsec_…"}` (the secret deliveries are signed with, shown
    /// once; a new one each time), `DELETE` removes it (204). A refusal is a problem+json 4xx
    /// (403 when the plan does not send alerts to tenants, 409 `file-tenant` for a tenant
    /// declared in the configuration file, which keeps no endpoint (its alerts go to
    /// `[alerts]`'s), 422 for a URL that is not https or
    /// resolves to a private address, 400 for a body that is not that JSON, 403
    /// `scope-missing` for a key without the scope, `key-not-live` for one that is not the
    /// tenant's live key; 503 when the directory does not answer) and stores nothing. The door crates mount
    /// it (`tollgate_axum::alert_endpoint`, `tollgate_actix::alert_endpoint`,
    /// `tollgate_lambda::alert_endpoint`).
    pub async fn tenant_alert_endpoint(
        &self,
        tenant: &TenantContext,
        caller: &Caller,
        method: &Method,
        body: &[u8],
    ) -> http::Response<Bytes> {
        let config = self.shared().runtime().load().config.clone();
        let directory = &self.shared().stores().background().directory;
        let id = tenant.tenant();
        let who = match self.allowed(id, caller, method, KeyScope::AlertsWrite, "the alert endpoint").await {
            Ok(who) => who,
            Err(refused) => return refused,
        };
        let of_file = config.tenants().iter().any(|t| t.id() == id);
        match *method {
            Method::GET => match directory.tenant(id).await {
                Ok(Some(record)) => {
                    match record.alert_endpoint.and_then(|t| serde_json::from_str::<TenantEndpoint>(&t).ok()) {
                        Some(e) => json(StatusCode::OK, &serde_json::json!({ "url": e.url })),
                        None => problem(
                            StatusCode::NOT_FOUND,
                            "no-alert-endpoint",
                            "No alert endpoint",
                            "no endpoint is registered",
                        ),
                    }
                }
                // A tenant of the file has none of its own (`set_tenant_endpoint` refuses one);
                // one its directory record kept from before is shown above, as it is used.
                Ok(None) if of_file => problem(
                    StatusCode::NOT_FOUND,
                    "no-alert-endpoint",
                    "No alert endpoint",
                    "no endpoint is registered",
                ),
                Ok(None) => problem(
                    StatusCode::NOT_FOUND,
                    "unknown-tenant",
                    "Unknown tenant",
                    "the tenant is not in the directory",
                ),
                Err(_) => {
                    problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "Store unavailable", "try again")
                }
            },
            Method::PUT => {
                if body.len() > endpoint::MAX_BODY {
                    return too_large("4 KiB");
                }
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Put {
                    url: String,
                }
                let Ok(put) = serde_json::from_slice::<Put>(body) else {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "bad-request",
                        "Bad request",
                        "expected {\"url\": \"https://…\"}",
                    );
                };
                let before = directory.tenant(id).await;
                match endpoint::set_tenant_endpoint(directory.as_ref(), &config, id, Some(&put.url)).await {
                    Ok(secret) => {
                        let before =
                            crate::settings::before_text(before, |r| crate::settings::endpoint_text(r.as_ref()));
                        let actor = crate::settings::route_actor(&who);
                        let after = secret.as_ref().map(|s| crate::settings::endpoint_written(&put.url, &s.expose()));
                        self.record_change(id, actor, Setting::AlertEndpoint, before, after).await;
                        json(
                            StatusCode::OK,
                            &serde_json::json!({ "url": put.url, "secret": secret.map(|s| s.expose()) }),
                        )
                    }
                    Err(e) => endpoint_problem(&e),
                }
            }
            Method::DELETE => {
                let before = directory.tenant(id).await;
                match endpoint::set_tenant_endpoint(directory.as_ref(), &config, id, None).await {
                    Ok(_) => {
                        let before =
                            crate::settings::before_text(before, |r| crate::settings::endpoint_text(r.as_ref()));
                        self.record_change(
                            id,
                            crate::settings::route_actor(&who),
                            Setting::AlertEndpoint,
                            before,
                            None,
                        )
                        .await;
                        no_content()
                    }
                    Err(e) => endpoint_problem(&e),
                }
            }
            _ => not_get_put_delete(),
        }
    }
}

/// What the usage route asks of its caller.
const USAGE: Need = Need { scope: KeyScope::UsageRead, write: false, thing: "the usage" };

/// The usage route's refusal of a caller by its scopes: a key not among those its view read
/// may have been issued since (the next view, within a second, has it).
/// The refusal of a poll whose view the node's budget of refreshes could not make (503,
/// `Retry-After: 1`).
fn over_budget() -> crate::response::Rejection {
    crate::response::Rejection::new(
        crate::response::RejectionKind::StoreUnavailable,
        "this node makes no more usage views this second (usage.view_refresh_rate); try again",
    )
    .with_retry_after(1)
}

fn usage_refused(e: &ScopeError) -> http::Response<Bytes> {
    match e {
        ScopeError::NotLive("API key") => {
            let mut r = problem(
                StatusCode::FORBIDDEN,
                "key-not-live",
                "Key not live",
                "this API key is not one of the tenant's live keys as last read (revoked, expired, or issued within \
                 the last second: try again)",
            );
            r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            r
        }
        e => scope_problem(e),
    }
}

/// A caller refused by its scopes (problem+json): 403, or 503 when the directory did not
/// answer.
fn scope_problem(e: &ScopeError) -> http::Response<Bytes> {
    match e {
        ScopeError::Missing { .. } => problem(StatusCode::FORBIDDEN, "scope-missing", "Scope missing", &e.to_string()),
        ScopeError::NotLive(_) => problem(StatusCode::FORBIDDEN, "key-not-live", "Key not live", &e.to_string()),
        ScopeError::Store(_) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "Store unavailable", "try again")
        }
    }
}

/// A refused spend cap as the tenant's route answers it (problem+json).
fn cap_problem(e: &CapError) -> http::Response<Bytes> {
    let detail = e.to_string();
    match e {
        CapError::UnknownTenant(_) => problem(StatusCode::NOT_FOUND, "unknown-tenant", "Unknown tenant", &detail),
        CapError::NoSpendCap(_) => problem(StatusCode::FORBIDDEN, "no-spend-cap", "No spend cap", &detail),
        CapError::NotAnAmount(_) => problem(StatusCode::BAD_REQUEST, "bad-request", "Not an amount", &detail),
        CapError::SoftUnderHard => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "cap-mode", "A hard spend cap stays hard", &detail)
        }
        CapError::AboveMax { .. } => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "cap-above-max", "Spend cap above the maximum", &detail)
        }
        CapError::NotServed(_) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "plan-not-served", "Plan not served", &detail)
        }
        CapError::Store(_) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "Store unavailable", "try again")
        }
    }
}

/// A refusal as the tenant's route answers it (problem+json).
fn recharge_problem(e: &RechargeError) -> http::Response<bytes::Bytes> {
    let detail = e.to_string();
    match e {
        RechargeError::UnknownTenant(_) => problem(StatusCode::NOT_FOUND, "unknown-tenant", "Unknown tenant", &detail),
        RechargeError::NoRecharge { .. } => problem(StatusCode::FORBIDDEN, "no-recharge", "No recharge", &detail),
        RechargeError::NotAllowed { .. } => {
            problem(StatusCode::FORBIDDEN, "recharge-not-allowed", "Recharge set by the operator only", &detail)
        }
        RechargeError::Invalid(_) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "recharge-invalid", "Recharge settings refused", &detail)
        }
        RechargeError::NotServed(_) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "plan-not-served", "Plan not served", &detail)
        }
        RechargeError::Price(_) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "recharge-price", "Recharge price unavailable", &detail)
        }
        RechargeError::Store(_) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", "Store unavailable", "try again")
        }
    }
}

/// The problem+json of a refused registration.
fn endpoint_problem(e: &EndpointError) -> http::Response<Bytes> {
    let (kind, title) = match e {
        EndpointError::UnknownTenant(_) => ("unknown-tenant", "Unknown tenant"),
        EndpointError::NotOnPlan(_) => ("alerts-not-on-plan", "Alerts not on this plan"),
        EndpointError::FileTenant(_) => ("file-tenant", "Tenant of the configuration file"),
        EndpointError::BadUrl(_) => ("bad-alert-endpoint", "Endpoint refused"),
        EndpointError::Store(_) => ("store-unavailable", "Store unavailable"),
    };
    let detail = match e {
        EndpointError::Store(_) => "the endpoint was not stored; try again".to_owned(),
        e => e.to_string(),
    };
    problem(e.status(), kind, title, &detail)
}
