//! The routes an application mounts for its tenants behind tollgate's layer: their own spend
//! cap ([`Tollgate::tenant_spend_cap`]) and their own alert endpoint
//! ([`Tollgate::tenant_alert_endpoint`]). Their rules are the usage part's (`usage/caps.rs`)
//! and the alerts part's (`alerts/endpoint.rs`); the answers are `response::route`'s.

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::engine::{alerts::endpoint, recharge::settings, usage::caps, TenantContext, Tollgate};
use crate::response::route::{json, no_content, not_get_put_delete, problem, too_large};

impl Tollgate {
    /// The route an application mounts for its tenants' own spend cap, behind tollgate's
    /// layer (the calling tenant's cap; any key of the tenant may set it): `GET` answers the
    /// cap in force (`{"currency", "limit", "mode", "max_limit", "plan_limit", "set_by"}`,
    /// amounts as decimal strings of the currency), `PUT` with `{"limit": "25.00", "mode":
    /// "hard"}` (`mode` optional: the plan's) sets the tenant's own, at most the plan's
    /// `spend.max_limit` (or the operator's override), and answers the same; `DELETE` removes
    /// it (the plan's holds again; 204). Every node holds reservations to it from its next
    /// call to the store (a raised cap is seen within a second; a lowered one lets through at
    /// most the spend leases nodes hold already). A refusal is a problem+json 4xx (403 when
    /// the plan has no spend cap, 422 above the maximum, 400 for a body that is not that JSON
    /// or a limit that is not an amount) and stores nothing. The door crates mount it
    /// (`tollgate_axum::spend_cap`, `tollgate_actix::spend_cap`).
    pub async fn tenant_spend_cap(
        &self,
        tenant: &TenantContext,
        method: &Method,
        body: &[u8],
    ) -> http::Response<Bytes> {
        let config = self.shared().runtime().load().config.clone();
        let stores = self.shared().stores().background();
        let now = self.shared().clock().unix_secs();
        let id = tenant.tenant();
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
                    Err(e) => return caps::cap_problem(&e),
                }
            }
            Method::DELETE => caps::CapAct::Remove,
            _ => return not_get_put_delete(),
        };
        let removing = act == caps::CapAct::Remove;
        let answer = caps::spend_cap(stores.quota.as_ref(), stores.directory.as_ref(), &config, id, act, now).await;
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
            Err(e) => caps::cap_problem(&e),
        }
    }

    /// The route an application mounts for its tenants' own auto-recharge, behind tollgate's
    /// layer (the calling tenant's; any key of the tenant may set it): `GET` answers its
    /// recharge (`{"meter", "currency", "on", "off_reason", "settings", "plan", "failures",
    /// "open", "month"}`, money as decimal strings of the currency), `PUT` with `{"below":
    /// 10000, "to": 50000, "monthly_limit": "200.00"}` (each optional: the plan's; `{}` for all
    /// of the plan's; an empty body is refused) turns it on
    /// within the plan's bounds (`to` and `monthly_limit` at most the plan's, `below` under
    /// `to`) and answers the same, `DELETE` turns it off (204). Each body may name the meter
    /// (`"meter": "tokens"`); without one, the plan's one recharged meter. A refusal is a
    /// problem+json 4xx and stores nothing: 422 for values outside the bounds or not numbers
    /// (or a body that is not that JSON), 403 when the plan recharges nothing there, 503 when
    /// Stripe could not say the price's amount or the store failed. The door crates mount it
    /// (`tollgate_axum::recharge`, `tollgate_actix::recharge`).
    pub async fn tenant_recharge(&self, tenant: &TenantContext, method: &Method, body: &[u8]) -> http::Response<Bytes> {
        if ![Method::GET, Method::PUT, Method::DELETE].contains(method) {
            return not_get_put_delete();
        }
        if body.len() > settings::MAX_BODY {
            return too_large("1 KiB");
        }
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
            None => {
                let plan = config
                    .plans()
                    .get(tenant.plan())
                    .map(|p| p.recharges().map(|(m, _)| m.clone()).collect::<Vec<_>>());
                match plan.as_deref() {
                    Some([only]) => only.clone(),
                    Some([]) | None => {
                        return settings::recharge_problem(&settings::RechargeError::NoRecharge {
                            plan: tenant.plan().to_string(),
                            meter: "any meter".into(),
                        })
                    }
                    Some(_) => return invalid("this plan recharges several meters: name one (\"meter\": \"…\")"),
                }
            }
        };
        let ask = settings::RechargeAsk::new(body.below, body.to, body.monthly_limit);
        let answer = match *method {
            Method::GET => self.recharge(tenant.tenant(), &meter).await,
            Method::PUT => self.set_recharge(tenant.tenant(), &meter, Some(ask)).await,
            Method::DELETE => self.set_recharge(tenant.tenant(), &meter, None).await,
            _ => return not_get_put_delete(),
        };
        match answer {
            Ok(_) if *method == Method::DELETE => no_content(),
            Ok(view) => json(StatusCode::OK, &view.to_json()),
            Err(e) => settings::recharge_problem(&e),
        }
    }

    /// The route an application mounts for its tenants' own alert endpoint, behind tollgate's
    /// layer (the calling tenant is the one it sets; any key of the tenant may): `GET` answers
    /// `{"url": …}` (404 without one), `PUT` with `{"url": "https://…"}` registers it and
    /// answers `{"url": …, "secret": "whsec_…"}` (the secret deliveries are signed with, shown
    /// once; a new one each time), `DELETE` removes it (204). A refusal is a problem+json 4xx
    /// (403 when the plan does not send alerts to tenants, 422 for a URL that is not https or
    /// resolves to a private address, 400 for a body that is not that JSON) and stores
    /// nothing. The door crates mount it (`tollgate_axum::alert_endpoint`,
    /// `tollgate_actix::alert_endpoint`).
    pub async fn tenant_alert_endpoint(
        &self,
        tenant: &TenantContext,
        method: &Method,
        body: &[u8],
    ) -> http::Response<Bytes> {
        let config = self.shared().runtime().load().config.clone();
        let directory = &self.shared().stores().background().directory;
        let id = tenant.tenant();
        match *method {
            Method::GET => match directory.tenant(id).await {
                Ok(Some(record)) => {
                    match record
                        .alert_endpoint
                        .and_then(|t| serde_json::from_str::<crate::engine::alerts::TenantEndpoint>(&t).ok())
                    {
                        Some(e) => json(StatusCode::OK, &serde_json::json!({ "url": e.url })),
                        None => problem(
                            StatusCode::NOT_FOUND,
                            "no-alert-endpoint",
                            "No alert endpoint",
                            "no endpoint is registered",
                        ),
                    }
                }
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
                match endpoint::set_tenant_endpoint(directory.as_ref(), &config, id, Some(&put.url)).await {
                    Ok(secret) => json(
                        StatusCode::OK,
                        &serde_json::json!({ "url": put.url, "secret": secret.map(|s| s.expose()) }),
                    ),
                    Err(e) => endpoint::endpoint_problem(&e),
                }
            }
            Method::DELETE => match endpoint::set_tenant_endpoint(directory.as_ref(), &config, id, None).await {
                Ok(_) => no_content(),
                Err(e) => endpoint::endpoint_problem(&e),
            },
            _ => not_get_put_delete(),
        }
    }
}
