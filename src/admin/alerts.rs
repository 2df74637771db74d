//! The alerts outbox and tenants' own alert endpoints.

use crate::{
    settings::endpoint::{set_tenant_endpoint, EndpointError},
    store::{AlertKey, AlertQuery, AlertState, OutboxEntry, OutboxStore},
};

use super::{Admin, AdminError};

impl Admin {
    fn outbox(&self) -> Result<&dyn OutboxStore, AdminError> {
        self.alerts
            .as_deref()
            .ok_or_else(|| AdminError::Invalid("no alerts store was given (Admin::with_alerts)".into()))
    }

    /// The outbox's rows `query` reads (in key order).
    ///
    /// # Errors
    /// The store failed, or no alerts store was given.
    pub async fn alerts(&self, query: &AlertQuery) -> Result<Vec<OutboxEntry>, AdminError> {
        Ok(self.outbox()?.list_alerts(query).await?)
    }

    /// The dead letters of the outbox (alerts given up after `alerts.retry_for`), in key order
    /// after `after`, at most `limit`.
    ///
    /// # Errors
    /// The store failed, or no alerts store was given.
    pub async fn alert_dead_letters(
        &self,
        after: Option<AlertKey>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, AdminError> {
        let mut query = AlertQuery::new(limit).state(AlertState::Dead);
        query.after = after;
        self.alerts(&query).await
    }

    /// Sends alert `id` again: each of its dead letters (one per destination) is pending
    /// again, due now, with a retry horizon from now. Returns how many were requeued (none:
    /// the alert has no dead letter).
    ///
    /// # Errors
    /// The store failed, or no alerts store was given.
    pub async fn retry_alert(&self, id: &str) -> Result<usize, AdminError> {
        let outbox = self.outbox()?;
        let rows = outbox.list_alerts(&AlertQuery::new(100).id(id).state(AlertState::Dead)).await?;
        let mut requeued = 0;
        for row in rows {
            if outbox.requeue_alert(&row.key, self.clock.unix_secs()).await? {
                requeued += 1;
            }
        }
        Ok(requeued)
    }

    /// Registers `url` as `tenant`'s own endpoint for its alerts, returning the new signing
    /// secret (`whsec_…`, shown once: deliveries are signed with it), or with `None` removes
    /// it. The tenant's plan must send alerts to tenants (`tenant_alerts = true`), and the URL
    /// be `https` and resolve only to public addresses (or `alerts.allow_private`); refused,
    /// nothing is stored. The secret is kept at rest in the directory.
    ///
    /// # Errors
    /// [`AdminError::AlertEndpoint`] with why, or the store failed; without a configuration,
    /// [`AdminError::Invalid`].
    pub async fn set_alert_endpoint(&self, tenant: &str, url: Option<&str>) -> Result<Option<String>, AdminError> {
        let config = self.config.as_ref().ok_or_else(|| {
            AdminError::Invalid("a tenant's alert endpoint is checked against the configuration".into())
        })?;
        let id = Self::tenant_id(tenant)?;
        let before = self.directory.tenant(&id).await;
        let secret = set_tenant_endpoint(self.directory.as_ref(), config, &id, url).await.map_err(|e| match e {
            EndpointError::UnknownTenant(t) => AdminError::UnknownTenant(t),
            EndpointError::Store(e) => AdminError::Store(e),
            e => AdminError::AlertEndpoint(e),
        })?;
        self.changed(&id).await;
        let before = crate::settings::before_text(before, |r| crate::settings::endpoint_text(r.as_ref()));
        let after = url.zip(secret.as_ref()).map(|(u, s)| crate::settings::endpoint_written(u, &s.expose()));
        self.record(&id, crate::store::Setting::AlertEndpoint, before, after).await;
        Ok(secret.map(|s| s.expose()))
    }
}
