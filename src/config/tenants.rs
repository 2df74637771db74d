//! `[tenants.<name>]`: tenants declared in the file.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;

use super::{plans::RawOverride, validator::Validator, EventSettings, MeterSpec, PlanOverride, PlanSpec, RouteSpec};
use super::{ConfigError, ConfigErrorKind as Kind};
use crate::base::{KeyHash, KeyScopes, MeterId, OrgId, PlanId, TenantId};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub(crate) plan: String,
    #[serde(default)]
    pub(crate) keys: Vec<String>,
    #[serde(default)]
    pub(crate) key_sha256: Vec<String>,
    pub(crate) key_scopes: Option<Vec<String>>,
    pub(crate) stripe_customer: Option<String>,
    pub(crate) metronome_customer: Option<String>,
    pub(crate) overrides: Option<RawOverride>,
    pub(crate) org: Option<String>,
}

/// The tenant that unknown callers are served as, with `identify.unknown = "anonymous"`.
pub(crate) const ANONYMOUS_TENANT: &str = "anonymous";

/// A tenant declared in the file (for development and small deployments).
#[derive(Clone)]
pub struct TenantSpec {
    pub(crate) id: TenantId,
    pub(crate) plan: PlanId,
    pub(crate) key_hashes: Vec<crate::base::KeyHash>,
    pub(crate) key_scopes: KeyScopes,
    pub(crate) stripe_customer: Option<String>,
    pub(crate) metronome_customer: Option<String>,
    pub(crate) overrides: Option<PlanOverride>,
    pub(crate) org: Option<OrgId>,
}

impl std::fmt::Debug for TenantSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSpec")
            .field("id", &self.id)
            .field("plan", &self.plan)
            .field("keys", &self.key_hashes.len())
            .finish_non_exhaustive()
    }
}

impl TenantSpec {
    /// The tenant's identifier.
    #[must_use]
    pub fn id(&self) -> &TenantId {
        &self.id
    }

    /// The tenant's plan.
    #[must_use]
    pub fn plan(&self) -> &PlanId {
        &self.plan
    }

    /// The SHA-256 hashes of the tenant's API keys (keys are never kept in clear).
    #[must_use]
    pub fn key_hashes(&self) -> &[crate::base::KeyHash] {
        &self.key_hashes
    }

    /// The scopes of the tenant's keys declared here (`key_scopes`; without it
    /// [`KeyScopes::DEFAULT`]).
    #[must_use]
    pub fn key_scopes(&self) -> KeyScopes {
        self.key_scopes
    }

    /// The tenant's Stripe customer id, if declared.
    #[must_use]
    pub fn stripe_customer(&self) -> Option<&str> {
        self.stripe_customer.as_deref()
    }

    /// The tenant's Metronome customer id or ingest alias, if declared.
    #[must_use]
    pub fn metronome_customer(&self) -> Option<&str> {
        self.metronome_customer.as_deref()
    }

    /// The tenant's overrides of its plan, if declared.
    #[must_use]
    pub fn overrides(&self) -> Option<&PlanOverride> {
        self.overrides.as_ref()
    }

    /// The organization the tenant belongs to (`org`), if any: its plan's limits apply to the
    /// tenant's requests together with its other tenants'.
    #[must_use]
    pub fn org(&self) -> Option<&OrgId> {
        self.org.as_ref()
    }
}

impl Validator<'_, '_> {
    /// `[tenants]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tenants(
        &self,
        raw: &BTreeMap<String, RawTenant>,
        plans: &BTreeMap<PlanId, PlanSpec>,
        orgs: &BTreeMap<OrgId, super::OrgSpec>,
        meters: &[MeterSpec],
        routes: &[RouteSpec],
        default_meter: &MeterId,
        events: &EventSettings,
        billing: &super::BillingSettings,
    ) -> Result<Vec<TenantSpec>, ConfigError> {
        let mut tenants = Vec::with_capacity(raw.len());
        let mut keys_seen = HashSet::new();
        let mut customers: HashMap<&str, &str> = HashMap::new();
        let mut metronome_customers: HashMap<&str, &str> = HashMap::new();
        for (name, t) in raw {
            let base = format!("tenants.{name}");
            let id = TenantId::parse(name).map_err(|e| self.invalid(&base, e.to_string()))?;
            let plan = self.plan_ref(plans, &format!("{base}.plan"), &t.plan)?;
            let org = match t.org.as_deref() {
                None => None,
                Some(_) if plans[&plan].shadow => {
                    return Err(self.invalid(
                        &format!("{base}.org"),
                        format!(
                            "plan `{plan}` is in shadow mode, which an organization does not apply to its limits yet: \
                             a tenant in shadow mode cannot be in an organization"
                        ),
                    ))
                }
                Some(name) => match orgs.get(name) {
                    Some(o) => Some(o.id.clone()),
                    None => {
                        return Err(self.loc.error(
                            Kind::UnknownReference,
                            &format!("{base}.org"),
                            format!("unknown organization `{name}`: declare it as [orgs.{name}] with its plan"),
                        ))
                    }
                },
            };
            if let Some(c) = t.stripe_customer.as_deref() {
                let path = format!("{base}.stripe_customer");
                if c.is_empty() || c.len() > 255 || !c.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is not a Stripe customer id (leave the key out for a tenant without one)"),
                    ));
                }
                if let Some(other) = customers.insert(c, name) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is also tenants.{other}'s: a billing customer belongs to one tenant"),
                    ));
                }
            }
            if let Some(c) = t.metronome_customer.as_deref() {
                let path = format!("{base}.metronome_customer");
                if c.trim() != c || c.is_empty() || c.len() > 255 || c.chars().any(char::is_control) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is not a Metronome customer id or ingest alias (leave the key out for a tenant without one)"),
                    ));
                }
                if let Some(other) = metronome_customers.insert(c, name) {
                    return Err(self.invalid(
                        &path,
                        format!("`{c}` is also tenants.{other}'s: a billing customer belongs to one tenant"),
                    ));
                }
            }
            let mut key_hashes = Vec::new();
            for (i, key) in t.keys.iter().enumerate() {
                if let Err(m) = crate::base::check_api_key(key.as_bytes()) {
                    return Err(self.invalid(&format!("{base}.keys[{i}]"), m));
                }
                key_hashes.push(KeyHash::of(key.as_bytes()));
            }
            for (i, hex) in t.key_sha256.iter().enumerate() {
                let hash = KeyHash::from_hex(hex).ok_or_else(|| {
                    self.invalid(
                        &format!("{base}.key_sha256[{i}]"),
                        "expected 64 hexadecimal digits (a SHA-256 digest)",
                    )
                })?;
                key_hashes.push(hash);
            }
            let mut key_scopes = KeyScopes::DEFAULT;
            if let Some(names) = &t.key_scopes {
                key_scopes = KeyScopes::NONE;
                for (i, name) in names.iter().enumerate() {
                    let scope = crate::base::KeyScope::ALL.into_iter().find(|s| s.name() == name).ok_or_else(|| {
                        self.invalid(
                            &format!("{base}.key_scopes[{i}]"),
                            format!(
                                "`{name}` is not a key scope: expected usage:read, caps:write, alerts:write or \
                                 recharge:write ([] for none)"
                            ),
                        )
                    })?;
                    key_scopes = key_scopes.with(scope);
                }
            }
            for (i, hash) in key_hashes.iter().enumerate() {
                if !keys_seen.insert(*hash) {
                    return Err(self.loc.error(
                        Kind::Conflict,
                        &format!("{base}.keys[{i}]"),
                        "this key is already given to a tenant",
                    ));
                }
            }
            let overrides = match &t.overrides {
                None => None,
                Some(o) => {
                    let o = self.plan_override(&format!("{base}.overrides"), o, meters, billing)?;
                    let merged = plans[&plan].with_override(&o);
                    if o.burst.is_some() && merged.rate.is_none() {
                        return Err(self.invalid(&format!("{base}.overrides.burst"), "a burst needs a rate"));
                    }
                    if merged.rate_scope == super::Scope::Fleet && merged.rate.is_none() {
                        return Err(self.invalid(&format!("{base}.overrides.rate_scope"), "a fleet rate needs a rate"));
                    }
                    let mut one = BTreeMap::new();
                    one.insert(merged.id.clone(), merged.clone());
                    // The merged plan must hold as a plan does: every route's cost within its
                    // burst, its hard quotas enforced by some route or event.
                    for (i, r) in routes.iter().enumerate() {
                        if merged.rate.is_some() && r.cost > merged.burst {
                            return Err(self.invalid(
                                &format!("{base}.overrides"),
                                format!(
                                    "routes[{i}] costs {} and the overridden burst is {}: no request could ever pass",
                                    r.cost, merged.burst
                                ),
                            ));
                        }
                    }
                    self.hard_quotas_are_reachable(&one, routes, default_meter, events)
                        .map_err(|e| self.invalid(&format!("{base}.overrides.quotas"), e.message().to_owned()))?;
                    (!o.is_empty()).then_some(o)
                }
            };
            tenants.push(TenantSpec {
                key_scopes,
                id,
                plan,
                key_hashes,
                stripe_customer: t.stripe_customer.clone(),
                metronome_customer: t.metronome_customer.clone(),
                overrides,
                org,
            });
        }
        Ok(tenants)
    }
}
