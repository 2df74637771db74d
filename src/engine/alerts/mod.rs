//! Alerts: threshold crossings written once per fleet to the outbox (the alerts role), and
//! delivered from it as signed webhooks (Standard Webhooks), one node at a time per alert.
//!
//! A node finds a crossing in a store's answer (a lease refill), queues it without a store
//! call ([`AlertQueue`]), and its next flush writes its rows put-if-absent under the
//! crossing's deterministic id: however many nodes see it, the fleet holds one row per alert
//! and destination. The worker claims due rows, posts them, and settles each: delivered, due
//! again later (exponential backoff), or a dead letter past `alerts.retry_for`.

#[cfg(feature = "alerts")]
mod deliver;
mod queue;
mod recharge;

#[cfg(feature = "alerts")]
pub(crate) use deliver::Deliverer;
use std::time::Duration;

#[cfg(feature = "alerts")]
use queue::ENDPOINT;
use queue::TENANT as TENANT_DESTINATION;
#[cfg(feature = "alerts")]
use queue::TENANT;
pub(crate) use queue::{AlertQueue, Crossing, Threshold};
pub(crate) use recharge::{RechargeAlert, RechargeEvent};

use std::sync::Arc;

#[cfg(feature = "alerts")]
use crate::settings::endpoint::TenantEndpoint;
use crate::{
    engine::shared::Shared,
    store::{AlertClaim, AlertOutcome, OutboxEntry},
};

/// The most rows one claim takes.
const CLAIM_BATCH: usize = 32;
/// The most deliveries under way at once on a node.
#[cfg(feature = "alerts")]
const AT_ONCE: usize = 16;
/// What a claim keeps back for the settle after its delivery (and the second a claim in whole
/// seconds may lose).
pub(crate) const SETTLE_MARGIN: Duration = Duration::from_secs(3);
/// The least time an attempt is started with.
#[cfg(feature = "alerts")]
pub(crate) const MIN_ATTEMPT: Duration = Duration::from_secs(1);
/// The first retry's delay, doubled at each attempt up to [`MAX_BACKOFF_SECS`].
#[cfg(feature = "alerts")]
const FIRST_BACKOFF_SECS: i64 = 5;
#[cfg(feature = "alerts")]
const MAX_BACKOFF_SECS: i64 = 6 * 3_600;

/// What a pass over the outbox did ([`Tollgate::deliver_alerts`](crate::Tollgate::deliver_alerts)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlertReport {
    /// Rows claimed for delivery.
    pub claimed: usize,
    /// Delivered (2xx).
    pub delivered: usize,
    /// Failed, due again later.
    pub retried: usize,
    /// Failed past the retry horizon (or with nowhere to go): dead letters.
    pub dead: usize,
}

/// The delay before attempt `attempts + 1` of a row (`attempts` made): 5 s doubled each time,
/// at most 6 h, give or take a fifth (spread by the row's id, the same on every node).
#[cfg(feature = "alerts")]
pub(crate) fn backoff_secs(id: &str, attempts: u32) -> i64 {
    let base = FIRST_BACKOFF_SECS.saturating_mul(1i64 << attempts.min(20)).min(MAX_BACKOFF_SECS);
    let spread = id.bytes().fold(attempts as i64, |h, b| h.wrapping_mul(31).wrapping_add(i64::from(b)));
    base + (base / 5) * (spread.rem_euclid(41) - 20) / 20
}

/// The newest open grant of a balance (by when it was granted, then id): what names its
/// episode.
fn newest_open_grant(grants: &[crate::store::CreditGrant]) -> String {
    grants
        .iter()
        .filter(|g| g.closed.is_none())
        .max_by(|a, b| (a.granted_at, &a.id).cmp(&(b.granted_at, &b.id)))
        .map(|g| format!("grant:{}:{}", g.granted_at, g.id))
        .unwrap_or_default()
}

/// The alerts part: crossings waiting to be written to the outbox, and the HTTP clients they
/// are delivered through.
pub(crate) struct Alerts {
    shared: Arc<Shared>,
    /// Crossings waiting to be written to the alerts outbox.
    queue: Arc<AlertQueue>,
    /// The HTTP clients alerts are delivered through, made at the first delivery.
    #[cfg(feature = "alerts")]
    deliverer: std::sync::OnceLock<Result<Deliverer, String>>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").finish_non_exhaustive()
    }
}

impl Alerts {
    pub(crate) fn new(shared: Arc<Shared>, queue: Arc<AlertQueue>) -> Self {
        Self {
            shared,
            queue,
            #[cfg(feature = "alerts")]
            deliverer: std::sync::OnceLock::new(),
        }
    }

    /// The HTTP clients alerts are delivered through (each call within `timeout`).
    #[cfg(feature = "alerts")]
    fn deliverer(&self, timeout: Duration) -> Result<&Deliverer, String> {
        self.deliverer.get_or_init(|| Deliverer::new(timeout)).as_ref().map_err(Clone::clone)
    }

    /// Writes the crossings this node saw to the alerts outbox, put-if-absent (a flush does;
    /// shutdown too): rows already there (another node's) are left as they are. A crossing
    /// whose write failed is seen again at a later refill and written then; one whose write
    /// was cut short (shutdown's deadline) stays queued.
    pub(crate) async fn write(&self) -> usize {
        let queue = &self.queue;
        if queue.is_empty() {
            return 0;
        }
        // One writer at a time (the worker's flush, a caller's, Lambda's): each takes the
        // queue's front after writing it.
        let _one = queue.writing.lock().await;
        let stores = self.shared.stores().background();
        // Read at each write: a namespace changed by an operator is used at once.
        let namespace = match stores.usage.identifier_namespace().await {
            Ok(ns) => ns,
            Err(e) => {
                tracing::warn!(error = %e, "alerts not written: the identifier namespace could not be read; tried at the next flush");
                return 0;
            }
        };
        let mut written = 0;
        while let Some((seq, crossing, mut to)) = queue.next() {
            // A tenant's own endpoint only when it registered one.
            if to.iter().any(|d| d == TENANT_DESTINATION) {
                match stores.directory.tenant(&crossing.tenant).await {
                    Ok(record) if record.as_ref().is_some_and(|r| r.alert_endpoint.is_some()) => {}
                    Ok(_) => to.retain(|d| d != TENANT_DESTINATION),
                    Err(e) => {
                        tracing::warn!(tenant = %crossing.tenant, error = %e, "an alert was not written; written when it is seen again");
                        queue.unmark(&crossing);
                        queue.written(seq);
                        continue;
                    }
                }
            }
            if to.is_empty() {
                queue.written(seq);
                continue;
            }
            // A balance's episode: its newest open grant (the same on every node until a grant
            // lands or closes), so the same limit reached again after its grants changed is a
            // new alert, and a balance long low is not alerted again by a node seeing it later.
            let mut crossing = crossing;
            if crossing.prepaid {
                match stores.quota.credit_grants(&crossing.tenant, Some(&crossing.meter)).await {
                    Ok((grants, _)) => crossing.episode = newest_open_grant(&grants),
                    Err(e) => {
                        tracing::warn!(tenant = %crossing.tenant, error = %e, "an alert was not written; written when it is seen again");
                        queue.unmark(&crossing);
                        queue.written(seq);
                        continue;
                    }
                }
            }
            let rows = crossing.rows(&namespace, &to);
            match stores.alerts.put_alerts(&rows).await {
                Ok(n) => {
                    written += n;
                    self.shared.metrics().alerts_written.increment(n as u64);
                }
                Err(e) => {
                    tracing::warn!(tenant = %crossing.tenant, error = %e, "an alert was not written; written when it is seen again");
                    queue.unmark(&crossing);
                }
            }
            queue.written(seq);
        }
        written + self.write_recharges(&namespace).await
    }

    /// Writes the recharges' alerts waiting (under the write's lock), each tried once: one
    /// whose write failed stays queued for the next flush (it is told once).
    async fn write_recharges(&self, namespace: &str) -> usize {
        let stores = self.shared.stores().background();
        let mut written = 0;
        for alert in self.queue.recharges_waiting() {
            let config = self.shared.runtime().load().config.clone();
            let record = match stores.directory.tenant(&alert.tenant).await {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(tenant = %alert.tenant, error = %e, "a recharge's alert was not written; tried at the next flush");
                    continue;
                }
            };
            let declared = config.tenants().iter().find(|t| t.id() == &alert.tenant).map(|t| t.plan().clone());
            let Some(plan) = declared.or_else(|| record.as_ref().map(|r| r.plan.clone())) else {
                self.queue.recharge_written(&alert);
                continue;
            };
            let tenant_alerts = config.plan(&plan).is_some_and(crate::config::PlanSpec::tenant_alerts)
                && record.as_ref().is_some_and(|r| r.alert_endpoint.is_some());
            let to = alert.destinations(config.alerts(), tenant_alerts);
            if !to.is_empty() {
                match stores.alerts.put_alerts(&alert.rows(namespace, &plan, &to)).await {
                    Ok(n) => {
                        written += n;
                        self.shared.metrics().alerts_written.increment(n as u64);
                    }
                    Err(e) => {
                        tracing::warn!(tenant = %alert.tenant, error = %e, "a recharge's alert was not written; tried at the next flush");
                        continue;
                    }
                }
            }
            self.queue.recharge_written(&alert);
        }
        written
    }

    /// Writes the recharges' alerts waiting now (a webhook before its answer, the worker after
    /// its deliveries), as a flush does; one not written stays queued.
    pub(crate) async fn write_recharges_now(&self) {
        let _one = self.queue.writing.lock().await;
        match self.shared.stores().background().usage.identifier_namespace().await {
            Ok(namespace) => {
                self.write_recharges(&namespace).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "recharges' alerts not written: the identifier namespace could not be read; tried at the next flush");
            }
        }
    }

    /// Whether `alert` still waits to be written.
    pub(crate) fn waiting(&self, alert: &RechargeAlert) -> bool {
        self.queue.recharges_waiting().contains(alert)
    }

    /// Queues a recharge's alert for the next write: `false` when it was dropped (too many
    /// waiting to be written, logged).
    pub(crate) fn recharge(&self, alert: RechargeAlert) -> bool {
        self.queue.offer_recharge(alert)
    }

    /// Whether any alert can have a destination under the configuration in force.
    pub(crate) fn configured(&self) -> bool {
        let rt = self.shared.runtime().load();
        !rt.config.alerts().endpoints.is_empty() || rt.config.plans().values().any(|p| p.tenant_alerts())
    }

    /// Delivers the alerts due (see
    /// [`Tollgate::deliver_alerts_within`](crate::Tollgate::deliver_alerts_within)).
    pub(crate) async fn deliver_within(&self, budget: Duration) -> AlertReport {
        let mut report = AlertReport::default();
        if !self.configured() {
            return report;
        }
        let started = tokio::time::Instant::now();
        let pass_end = started + budget;
        let settings = self.shared.runtime().load().config.alerts().clone();
        while tokio::time::Instant::now() < pass_end {
            let now = self.shared.clock().unix_secs();
            let claim_secs = i64::try_from(settings.claim.as_secs()).unwrap_or(i64::MAX);
            let owner = self.shared.ids().node().max(1);
            let claim = AlertClaim::new(owner, now, now.saturating_add(claim_secs), CLAIM_BATCH);
            // A claim is counted in whole seconds from `now`: it may end up to a second early,
            // and a settle needs its time too.
            let claim_end = tokio::time::Instant::now() + settings.claim.saturating_sub(SETTLE_MARGIN);
            let claimed = match self.shared.stores().background().alerts.claim_alerts(&claim).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "alerts: due rows could not be claimed; tried at the next pass");
                    return report;
                }
            };
            let full = claimed.len() == CLAIM_BATCH;
            report.claimed += claimed.len();
            let mut released = false;
            for label in self.deliver_claimed(claimed, owner, claim_end.min(pass_end)).await {
                match label {
                    "delivered" => report.delivered += 1,
                    "retried" => report.retried += 1,
                    "dead" => report.dead += 1,
                    _ => released = true,
                }
            }
            // A row given back unsent is due still: claiming again would take it again.
            if !full || released || pass_end.saturating_duration_since(tokio::time::Instant::now()) < SETTLE_MARGIN {
                break;
            }
        }
        report
    }

    /// Delivers claimed rows, [`AT_ONCE`] at a time, each settled as soon as it is done; one
    /// that could not end by `end` is not started (its claim is given back). The outcomes.
    #[cfg(feature = "alerts")]
    async fn deliver_claimed(
        &self,
        claimed: Vec<OutboxEntry>,
        owner: u64,
        end: tokio::time::Instant,
    ) -> Vec<&'static str> {
        use futures_util::StreamExt;
        // Each delivery owns what it needs: no future borrows across the batch.
        let deliveries = claimed.into_iter().map(|row| async move {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let outcome = if left < MIN_ATTEMPT { AlertOutcome::Release } else { self.deliver_one(&row, left).await };
            self.settle(&row, owner, outcome).await
        });
        futures_util::stream::iter(deliveries).buffer_unordered(AT_ONCE).collect().await
    }

    #[cfg(not(feature = "alerts"))]
    async fn deliver_claimed(
        &self,
        claimed: Vec<OutboxEntry>,
        owner: u64,
        _: tokio::time::Instant,
    ) -> Vec<&'static str> {
        // Without the feature nothing can be sent: the claims go (another node, built with
        // it, delivers them).
        let mut labels = Vec::new();
        for row in &claimed {
            labels.push(self.settle(row, owner, AlertOutcome::Release).await);
        }
        labels
    }

    /// Settles a delivery, counted: its label.
    async fn settle(&self, row: &OutboxEntry, owner: u64, outcome: AlertOutcome) -> &'static str {
        let label = match &outcome {
            AlertOutcome::Delivered { .. } => "delivered",
            AlertOutcome::Retry { error, .. } => {
                tracing::info!(alert = %row.key, error = %error, "an alert's delivery failed; tried again later");
                "retried"
            }
            AlertOutcome::Dead { error } => {
                tracing::warn!(alert = %row.key, error = %error, "an alert became a dead letter");
                "dead"
            }
            _ => "released",
        };
        self.shared.metrics().alert_deliveries(label).increment(1);
        match self.shared.stores().background().alerts.settle_alert(&row.key, owner, &outcome).await {
            Ok(true) => {}
            // Its claim expired and another node took it: it delivers it (again, under the
            // same id).
            Ok(false) => tracing::debug!(alert = %row.key, "an alert's claim was lost before its settle"),
            Err(e) => {
                tracing::warn!(alert = %row.key, error = %e, "an alert's delivery was not settled; delivered again")
            }
        }
        label
    }

    /// One delivery of `row`, within `left` at most (its destination read, its post made):
    /// its outcome.
    #[cfg(feature = "alerts")]
    async fn deliver_one(&self, row: &OutboxEntry, left: Duration) -> AlertOutcome {
        let settings = self.shared.runtime().load().config.alerts().clone();
        let limit = settings.timeout.min(left);
        let now = self.shared.clock().unix_secs();
        // Tried until its window ends (`retry_for` from when it was written, or sent again by
        // hand): a backoff step that would pass the window's end is cut to it, and a failure at
        // or past the end makes it a dead letter.
        let failed = |error: String| {
            let horizon = row.created_at.saturating_add(i64::try_from(settings.retry_for.as_secs()).unwrap_or(0));
            if now >= horizon {
                return AlertOutcome::Dead { error };
            }
            let at = now.saturating_add(backoff_secs(&row.key.id, row.attempts)).min(horizon);
            AlertOutcome::Retry { at, error }
        };
        let (tenant, url, secrets) = match self.destination(row, &settings).await {
            Ok(Some(to)) => to,
            Ok(None) => {
                return AlertOutcome::Dead { error: format!("{}: no such destination any more", row.key.destination) }
            }
            Err(e) => return failed(e),
        };
        let deliverer = match self.deliverer(settings.timeout) {
            Ok(d) => d,
            Err(e) => return failed(format!("no HTTP client: {e}")),
        };
        deliverer.allow_private(&settings.allow_private);
        // The signature's time is the wall clock's: receivers compare it with theirs.
        let timestamp = crate::store::unix_now();
        match deliverer.send(tenant, &url, &row.key.id, timestamp, &row.body, &secrets, limit).await {
            deliver::Sent::Delivered => AlertOutcome::Delivered { at: now },
            deliver::Sent::Failed(e) => failed(e),
        }
    }

    /// Where `row` goes: whether it is a tenant's endpoint, its URL and secrets; `None` when
    /// the destination is gone (an endpoint no longer in `[alerts]`, a tenant without one).
    #[cfg(feature = "alerts")]
    async fn destination(
        &self,
        row: &OutboxEntry,
        settings: &crate::config::AlertSettings,
    ) -> Result<Option<(bool, String, Vec<crate::base::WebhookSecret>)>, String> {
        if let Some(name) = row.key.destination.strip_prefix(ENDPOINT) {
            return Ok(settings.endpoint(name).map(|e| (false, e.url.clone(), e.secrets.clone())));
        }
        if row.key.destination != TENANT {
            return Ok(None);
        }
        let record = self
            .shared
            .stores()
            .background()
            .directory
            .tenant(&row.tenant)
            .await
            .map_err(|e| format!("the tenant's endpoint could not be read: {e}"))?;
        let Some(text) = record.and_then(|r| r.alert_endpoint) else { return Ok(None) };
        let endpoint: TenantEndpoint =
            serde_json::from_str(&text).map_err(|e| format!("the tenant's endpoint does not read: {e}"))?;
        if let Err(why) = settings.tenant_url(&endpoint.url) {
            return Err(format!("the tenant's endpoint is refused: {why}"));
        }
        let secrets = endpoint
            .secrets
            .iter()
            .map(|s| crate::base::WebhookSecret::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the tenant's secret does not read: {e}"))?;
        Ok(Some((true, endpoint.url, secrets)))
    }

    /// Prunes delivered and dead rows past their keep time (hourly, from the worker).
    pub(crate) async fn prune(&self) {
        let now = self.shared.clock().unix_secs();
        match self.shared.stores().background().alerts.prune_alerts(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "alerts: delivered and dead rows past their keep time pruned"),
            Err(e) => tracing::warn!(error = %e, "alerts: pruning failed; tried again in an hour"),
        }
    }
}

/// How long the worker waits between passes over the outbox.
pub(crate) const PASS_EVERY: Duration = Duration::from_secs(1);

#[cfg(all(test, feature = "alerts"))]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_six_hours_within_three_days() {
        assert!((4..=6).contains(&backoff_secs("alert_x", 0)));
        assert!((8..=12).contains(&backoff_secs("alert_x", 1)));
        assert!((17_280..=25_920).contains(&backoff_secs("alert_x", 30)));
        let (mut t, mut n) = (0, 0);
        while t < 3 * 86_400 {
            t += backoff_secs("alert_y", n);
            n += 1;
        }
        assert!((15..40).contains(&n), "{n} attempts in 3 days");
    }
}
