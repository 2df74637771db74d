//! A tenant's own endpoint for its alerts: registered through `Admin`, the CLI, or the route an
//! application mounts for its tenants ([`Tollgate::tenant_alert_endpoint`](crate::Tollgate::tenant_alert_endpoint)); checked at
//! registration (a URL, https, every address it resolves to public) and again at every
//! connection (the SSRF guard).

use http::StatusCode;

use crate::{
    base::{TenantId, WebhookSecret},
    config::Config,
    store::{DirectoryStore, StoreError, TenantUpdate, UpdateWhen},
};

/// The longest body the route reads.
pub(crate) const MAX_BODY: usize = 4 * 1024;

/// A tenant's own endpoint, as the directory keeps it (JSON).
#[cfg_attr(not(feature = "alerts"), allow(dead_code))]
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct TenantEndpoint {
    pub(crate) url: String,
    pub(crate) secrets: Vec<String>,
}

impl std::fmt::Debug for TenantEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantEndpoint").field("url", &self.url).field("secrets", &"<redacted>").finish()
    }
}

/// Why a tenant's endpoint was refused: nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// No such tenant.
    #[error("no tenant `{0}`")]
    UnknownTenant(String),
    /// The tenant is declared in the configuration file, which keeps no endpoint (the
    /// directory does): its alerts go to `[alerts]`'s endpoints.
    #[error(
        "tenant `{0}` is declared in the configuration file, which keeps no endpoint: its alerts go to \
         [alerts] endpoints (a tenant of the directory registers its own)"
    )]
    FileTenant(String),
    /// The tenant's plan does not send alerts to tenants (`tenant_alerts`).
    #[error("plan `{0}` does not send alerts to its tenants' endpoints (tenant_alerts)")]
    NotOnPlan(String),
    /// The URL is not one a tenant may register: why.
    #[error("{0}")]
    BadUrl(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EndpointError {
    /// The HTTP status of its problem+json answer.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            EndpointError::UnknownTenant(_) => StatusCode::NOT_FOUND,
            EndpointError::NotOnPlan(_) => StatusCode::FORBIDDEN,
            EndpointError::FileTenant(_) => StatusCode::CONFLICT,
            EndpointError::BadUrl(_) => StatusCode::UNPROCESSABLE_ENTITY,
            EndpointError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks `url` for a tenant under `config` and resolves its host: every address must be one
/// a tenant's endpoint may reach (a name that also resolves to a private address is refused).
pub(crate) async fn check_url(config: &Config, url: &str) -> Result<(), EndpointError> {
    let settings = config.alerts();
    let (host, port) = settings.tenant_url(url).map_err(EndpointError::BadUrl)?;
    #[cfg(feature = "alerts")]
    {
        let lookup =
            tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::lookup_host((host.as_str(), port)));
        let addrs: Vec<std::net::SocketAddr> = lookup
            .await
            .map_err(|_| EndpointError::BadUrl(format!("{host} did not resolve within 5 s")))?
            .map_err(|e| EndpointError::BadUrl(format!("{host} does not resolve: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(EndpointError::BadUrl(format!("{host} resolves to no address")));
        }
        if let Some(bad) = addrs.iter().find(|a| !settings.tenant_may_reach(a.ip())) {
            return Err(EndpointError::BadUrl(format!("{host} resolves to {}, not a public address", bad.ip())));
        }
        Ok(())
    }
    #[cfg(not(feature = "alerts"))]
    {
        let _ = (host, port);
        Err(EndpointError::BadUrl("this build cannot deliver alerts (the cargo feature `alerts`)".to_owned()))
    }
}

/// Registers `url` as `tenant`'s endpoint (a new signing secret, returned), or with `None`
/// removes it. Refused, nothing is stored.
pub(crate) async fn set_tenant_endpoint(
    directory: &dyn DirectoryStore,
    config: &Config,
    tenant: &TenantId,
    url: Option<&str>,
) -> Result<Option<WebhookSecret>, EndpointError> {
    // A tenant of the file is served as the file says, whatever the directory holds: it is
    // refused for what it is, not as unknown. A removal still clears what the directory may
    // hold under its name (from before it was declared in the file).
    let of_file = config.tenants().iter().find(|t| t.id() == tenant);
    if let (Some(spec), Some(_)) = (of_file, url) {
        return Err(match config.plan(spec.plan()).is_some_and(crate::config::PlanSpec::tenant_alerts) {
            false => EndpointError::NotOnPlan(spec.plan().to_string()),
            true => EndpointError::FileTenant(tenant.to_string()),
        });
    }
    let record = match directory.tenant(tenant).await? {
        Some(record) => record,
        None if of_file.is_some() => return Ok(None),
        None => return Err(EndpointError::UnknownTenant(tenant.to_string())),
    };
    let Some(url) = url else {
        let update = TenantUpdate::AlertEndpoint(tenant.clone(), None);
        return match directory.update_tenant(&update, UpdateWhen::Always).await? {
            true => Ok(None),
            false if of_file.is_some() => Ok(None),
            false => Err(EndpointError::UnknownTenant(tenant.to_string())),
        };
    };
    let allowed = config.plan(&record.plan).is_some_and(crate::config::PlanSpec::tenant_alerts);
    if !allowed {
        return Err(EndpointError::NotOnPlan(record.plan.to_string()));
    }
    check_url(config, url).await?;
    let secret = WebhookSecret::generate();
    let text = serde_json::to_string(&TenantEndpoint { url: url.to_owned(), secrets: vec![secret.expose()] })
        .map_err(|e| EndpointError::Store(StoreError::Backend(Box::new(e))))?;
    // Over the tenant as read: a plan change meanwhile (to a plan without tenant alerts) wins.
    let update = TenantUpdate::AlertEndpoint(tenant.clone(), Some(text));
    if !directory.update_tenant(&update, UpdateWhen::Unchanged(&record)).await? {
        return Err(EndpointError::Store(StoreError::Conflict("the tenant, changed while its endpoint was set")));
    }
    Ok(Some(secret))
}
