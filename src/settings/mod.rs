//! A tenant's settings: the rules of what a tenant is served and may set for itself, on the
//! configuration and the stores alone (no engine state). The engine compiles the served plan
//! for the request path and answers the tenant routes; `Admin`, the dashboard and the worker's
//! recharge delivery read the same rules.
//!
//! - `plan.rs`: the one served-plan rule (a tenant's plan, the overrides that fit it, what was
//!   dropped and why);
//! - `caps.rs`: a tenant's own spend cap within its plan's `spend.max_limit`, and a quota's
//!   limit in force;
//! - `recharge.rs`: a tenant's own auto-recharge within its plan's bounds;
//! - `endpoint.rs`: a tenant's own alert endpoint, checked at registration;
//! - `scopes.rs`: what a caller may do at its tenant's own routes (its key's scopes).
//!
//! `mod.rs` also says each setting as its audit records it (`store::AuditRecord`'s values).
//!
//! It sits below the engine and above `billing/` (the recharge price is read through its
//! charger), and imports nothing above itself; refusals become problem+json in the engine's
//! tenant routes.

pub(crate) mod caps;
pub(crate) mod endpoint;
pub(crate) mod plan;
pub(crate) mod recharge;
pub(crate) mod scopes;

/// A value before a change whose read failed, as the audit records it: never `none`, which
/// would say the setting was unset.
pub(crate) const NOT_READ: &str = "(not read)";

/// A value read before a change, as the audit records it: `text` of what was read, or
/// [`NOT_READ`].
pub(crate) fn before_text<T, E>(read: Result<T, E>, text: impl FnOnce(&T) -> Option<String>) -> Option<String> {
    match read {
        Ok(v) => text(&v),
        Err(_) => Some(NOT_READ.to_owned()),
    }
}

/// A tenant's own spend cap as its audit records it: `25.00 hard` (none: the plan's).
pub(crate) fn cap_text(own: Option<crate::base::SpendCap>) -> Option<String> {
    own.map(|c| format!("{} {}", crate::base::amount_of(c.limit), if c.hard { "hard" } else { "soft" }))
}

/// A tenant's recharge of a meter as its audit records it: `METER below=… to=… monthly_limit=…`
/// in the meter's units and the smallest unit of the currency, `off: WHY` once payments turned
/// it off; none when never set or turned off by hand.
pub(crate) fn recharge_text(view: &recharge::RechargeView) -> Option<String> {
    let s = view.state.setting.as_ref()?;
    let mut text = format!("{} below={} to={} monthly_limit={}", view.meter, s.below, s.to, s.monthly_limit);
    if let Some(why) = view.off_reason() {
        text.push_str(&format!(" off: {why}"));
    }
    Some(text)
}

/// A tenant's own alert endpoint as its audit records it ([`endpoint_written`]): its URL
/// without user, query or fragment, and fingerprints of the whole URL and of its signing
/// secret (a new secret for the same URL is a change), never the secret.
pub(crate) fn endpoint_text(record: Option<&crate::store::TenantRecord>) -> Option<String> {
    let json = record?.alert_endpoint.as_deref()?;
    let endpoint = serde_json::from_str::<endpoint::TenantEndpoint>(json).ok()?;
    Some(endpoint_written(&endpoint.url, endpoint.secrets.first().map_or("", String::as_str)))
}

/// An alert endpoint registered at `url` with `secret`, as [`endpoint_text`] reads it back:
/// the URL without its user, query or fragment (a receiver's token may be there), and a
/// fingerprint of the whole URL and of the secret (the first 12 hexadecimal digits of each
/// SHA-256): a change of either shows, neither can be read back.
pub(crate) fn endpoint_written(url: &str, secret: &str) -> String {
    let print = |v: &str| crate::base::KeyHash::of(v.as_bytes()).to_hex()[..12].to_owned();
    let shown = match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.split(['?', '#']).next().unwrap_or_default();
            let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => String::from("(not a URL)"),
    };
    format!("{shown} url=sha256:{} secret=sha256:{}", print(url), print(secret))
}

/// Who changed a setting at a tenant's own route, as [`scopes`]'s check names it
/// (`key:k_…`, or `tenant` for an [`Identity`](crate::Identity)).
pub(crate) fn route_actor(who: &str) -> crate::store::Actor {
    match who.strip_prefix("key:") {
        Some(id) => crate::store::Actor::Key(id.to_owned()),
        None => crate::store::Actor::Tenant(who.to_owned()),
    }
}
