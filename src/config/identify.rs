//! `[identify]`: how callers are identified, and client addresses through trusted proxies.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{validator::Validator, PlanSpec, Rate};
use super::{ConfigError, ForwardedHeader, IpRange};
use crate::base::PlanId;

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentify {
    pub(crate) source: Option<String>,
    pub(crate) header: Option<String>,
    pub(crate) unknown: Option<String>,
    pub(crate) anonymous_plan: Option<String>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    pub(crate) forwarded_header: Option<String>,
    pub(crate) ipv6_prefix: Option<i64>,
    pub(crate) unknown_key_rate: Option<String>,
}

/// How the tenant of a request is identified.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Identify {
    /// An API key in a request header, looked up in the tenant directory.
    ApiKey {
        /// The header carrying the key (`x-api-key` by default).
        header: http::HeaderName,
    },
    /// A [`Identity`](crate::Identity) that an authentication layer put in the request
    /// extensions.
    Extension,
}

/// What a request gets when its tenant is missing or unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnUnknown {
    /// 401 with an `application/problem+json` body.
    Reject,
    /// Served under this plan, all such requests sharing one anonymous tenant.
    Anonymous(PlanId),
}

/// Where a request comes from, for anonymous callers limited per client address
/// (`[identify]` `trusted_proxies`, `ipv6_prefix`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientSettings {
    /// Proxies whose forwarding header entries are believed.
    pub trusted_proxies: Vec<IpRange>,
    /// The header those proxies write the client's address in (only that one is read).
    pub forwarded_header: ForwardedHeader,
    /// IPv6 clients are grouped by this many leading bits (64 by default).
    pub ipv6_prefix: u8,
    /// How many API keys the directory is asked about per client address (10 a minute by
    /// default, at once up to the count): past it the address gets 429 (the key may be valid).
    /// Keys the directory knows are not counted.
    pub unknown_key_rate: Rate,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            ipv6_prefix: 64,
            unknown_key_rate: "10/min".parse().expect("a valid rate"),
        }
    }
}

impl Validator<'_, '_> {
    /// `[identify]` `trusted_proxies` and `ipv6_prefix`.
    pub(super) fn clients(&self, raw: &RawIdentify) -> Result<ClientSettings, ConfigError> {
        let mut settings = ClientSettings::default();
        for (i, r) in raw.trusted_proxies.iter().flatten().enumerate() {
            let range =
                super::IpRange::parse(r).map_err(|m| self.invalid(&format!("identify.trusted_proxies[{i}]"), m))?;
            settings.trusted_proxies.push(range);
        }
        settings.forwarded_header = match raw.forwarded_header.as_deref() {
            None | Some("x-forwarded-for") => super::ForwardedHeader::XForwardedFor,
            Some("forwarded") => super::ForwardedHeader::Forwarded,
            Some(other) => {
                return Err(self.invalid(
                    "identify.forwarded_header",
                    format!("expected \"x-forwarded-for\" or \"forwarded\", not \"{other}\""),
                ))
            }
        };
        if let Some(p) = raw.ipv6_prefix {
            settings.ipv6_prefix = u8::try_from(p)
                .ok()
                .filter(|p| (1..=128).contains(p))
                .ok_or_else(|| self.invalid("identify.ipv6_prefix", format!("must be 1 to 128, not {p}")))?;
        }
        if let Some(r) = &raw.unknown_key_rate {
            settings.unknown_key_rate = r
                .parse::<Rate>()
                .map_err(|e| self.invalid("identify.unknown_key_rate", format!("{e}, not \"{r}\"")))?;
        }
        Ok(settings)
    }

    /// `[identify]`: how tenants are identified, and what an unknown one gets.
    pub(super) fn identify(
        &self,
        raw: &RawIdentify,
        plans: &BTreeMap<PlanId, PlanSpec>,
    ) -> Result<(Identify, OnUnknown), ConfigError> {
        let identify = match raw.source.as_deref().unwrap_or("api-key") {
            "api-key" => {
                let header = raw.header.as_deref().unwrap_or("x-api-key");
                let header = http::HeaderName::try_from(header)
                    .map_err(|_| self.invalid("identify.header", format!("`{header}` is not a valid header name")))?;
                Identify::ApiKey { header }
            }
            "extension" => {
                if raw.header.is_some() {
                    return Err(self.invalid("identify.header", "only used with source = \"api-key\""));
                }
                Identify::Extension
            }
            _ => return Err(self.invalid("identify.source", "expected \"api-key\" or \"extension\"")),
        };
        let on_unknown = match (raw.unknown.as_deref().unwrap_or("reject"), &raw.anonymous_plan) {
            ("reject", None) => OnUnknown::Reject,
            ("reject", Some(_)) => {
                return Err(self.invalid("identify.anonymous_plan", "only used with unknown = \"anonymous\""))
            }
            ("anonymous", Some(plan)) => {
                let id = self.plan_ref(plans, "identify.anonymous_plan", plan)?;
                if plans.get(&id).is_some_and(|p| p.concurrency.is_some()) {
                    return Err(self.invalid(
                        &format!("plans.{plan}.concurrency"),
                        "the anonymous plan serves every unknown caller as one tenant: a concurrency limit would \
                         be one count shared by all of them (one slow client would lock out the rest)",
                    ));
                }
                if plans.get(&id).is_some_and(|p| p.rate_scope == super::Scope::Fleet) {
                    return Err(self.invalid(
                        &format!("plans.{plan}.rate_scope"),
                        "the anonymous plan's rate is kept per client address: a fleet rate would keep one bucket \
                         per address in the store, keys chosen by callers (keep it per node)",
                    ));
                }
                OnUnknown::Anonymous(id)
            }
            ("anonymous", None) => {
                return Err(self.invalid("identify.unknown", "unknown = \"anonymous\" needs anonymous_plan"))
            }
            _ => return Err(self.invalid("identify.unknown", "expected \"reject\" or \"anonymous\"")),
        };
        Ok((identify, on_unknown))
    }
}
