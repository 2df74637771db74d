//! The facade's verbs on tenants: the directory revalidated, a tenant or a key forgotten, and
//! what a change of the directory made elsewhere (a webhook, `Admin`) tells the engine.

use crate::engine::Tollgate;
use crate::{
    config::TenantId,
    store::{DirectoryEvents, RechargeNews, Told, WebhookCount},
};

impl Tollgate {
    /// Confirms with the store the tenants this node holds, off the request path (the worker
    /// calls it; front doors without one may too). Tenants last confirmed more than
    /// `limits.directory_ttl` ago and seen within it are read again, in batches: one store
    /// read per credential (`find_key`, or `tenant` for an identity). A credential the store
    /// no longer has stops working; a changed plan or customer gets a new state (the old
    /// one's usage is kept and billed, its leases go back). Tenants not seen within the TTL
    /// are dropped from the table instead, to be looked up on their next request. Tenants
    /// declared in the configuration are not read. Returns how many tenants were read.
    pub async fn revalidate(&self) -> usize {
        self.gate().revalidate().await
    }

    /// Reads the directory's feed of tenants changed (`store/changes.rs`; the worker does,
    /// every second) and reads again, at once, the tenants this node holds that changed since
    /// its last read: a plan change, new overrides or a revoked key written anywhere (`Admin`,
    /// the CLI, a Stripe webhook on another node) applies here within a second. At the first
    /// read, the tenants held that were told changed since the engine started are read again;
    /// every tenant held is read again when a change may have been missed (more than
    /// [`CHANGES_KEPT`](crate::store::CHANGES_KEPT) tenants changed between two reads).
    /// Returns how many tenants were marked to be read again.
    ///
    /// # Errors
    ///
    /// The store's, when the feed cannot be read (the worker tries again a second later; the
    /// tenants are still revalidated within `limits.directory_ttl`).
    pub async fn follow_directory(&self) -> Result<usize, crate::store::StoreError> {
        self.gate().follow_directory().await
    }

    /// Removes the audit's records (`store::AuditRecord`) older than
    /// [`AUDIT_KEPT_SECS`](crate::store::AUDIT_KEPT_SECS) by this engine's clock; returns how
    /// many went. The worker runs it a minute after the start, then once a day (each node of
    /// a fleet: a second prune finds nothing).
    ///
    /// # Errors
    /// The store failed (the next day's prune tries again).
    pub async fn prune_audit(&self) -> Result<u64, crate::store::StoreError> {
        let now = self.shared().clock().unix_nanos() / 1_000_000;
        let before = now.saturating_sub(crate::store::AUDIT_KEPT_SECS * 1_000);
        self.shared().stores().background().audit.prune_audit(before).await
    }

    /// The daily check of tiers (`[tiers.NAME]`): every tenant of the directory on a ladder's
    /// plan that its payments and the days since its first one now unlock a higher tier moves
    /// there (the worker runs it a minute after the start, then once a day; a fleet's nodes
    /// each run it, and a move is made once: on the condition that the tenant is as read, its
    /// alert named by the move). Reads the directory a page of 1,000 tenants at a time, and
    /// the ledger of each tenant on a ladder below its top. Returns how many tenants moved.
    ///
    /// A tenant whose move fails (its payments unreadable, its alert unwritten) is logged and
    /// passed: the others still move, and it is tried again at the next check.
    ///
    /// # Errors
    /// The directory's failure to list its tenants (the next check tries again).
    pub async fn check_tiers(&self) -> Result<usize, crate::store::StoreError> {
        const PAGE: usize = 1_000;
        let config = self.shared().runtime().load().config.clone();
        if config.tiers().is_empty() {
            return Ok(0);
        }
        let stores = self.shared().stores().background();
        let mut after: Option<TenantId> = None;
        let mut moved = 0;
        loop {
            let page = stores.directory.list_tenants(after.as_ref(), PAGE).await?;
            let full = page.len() == PAGE;
            after = page.last().map(|t| t.id.clone());
            for record in page {
                let Some(ladder) = config.tier_of(&record.plan) else { continue };
                if ladder.position(&record.plan).is_some_and(|at| at + 1 == ladder.plans().len()) {
                    continue;
                }
                let now = self.shared().clock().unix_secs();
                let tenant = record.id.clone();
                let (quota, directory) = (&*stores.quota, &*stores.directory);
                match crate::store::climb(quota, directory, self, &config, record, now, false).await {
                    Ok(moves) if moves.is_empty() => {}
                    Ok(moves) => {
                        moved += 1;
                        for (from, to) in moves {
                            let actor = crate::store::Actor::Tollgate("tier-check".to_owned());
                            let (from, to) = (Some(from.to_string()), Some(to.to_string()));
                            self.record_change(&tenant, actor, crate::store::Setting::Plan, from, to).await;
                        }
                    }
                    // One tenant's failure (its ledger unreadable, its alert unwritten) holds up
                    // no other's move.
                    Err(e) => {
                        tracing::warn!(%tenant, error = %e, "tiers: a tenant's move failed; tried again at the next check")
                    }
                }
            }
            if !full {
                return Ok(moved);
            }
        }
    }

    /// The end of graces past due (`[stripe] past_due_grace`, docs/stripe.md): every tenant
    /// of the directory whose subscription went `past_due` and whose grace is over moves to
    /// the past-due plan (its plan then follows every live subscription, as at a webhook). The
    /// worker runs it every 10 minutes (the first a minute after the start): a tenant moves at
    /// most 10 minutes after its grace ends, and on every node within a second of the move. A
    /// fleet's nodes each run it; a move is made once (conditional on the tenant's
    /// subscriptions as read, its id marked seen as a webhook event's). Reads the directory a
    /// page of 1,000 tenants at a time, and nothing without a grace configured. Returns how many
    /// tenants moved.
    ///
    /// # Errors
    /// The directory's failure to list its tenants (the next pass tries again). A tenant whose
    /// move fails is logged and passed.
    pub async fn check_past_due(&self) -> Result<usize, crate::store::StoreError> {
        #[cfg(feature = "stripe")]
        return self.webhook_handler_with_secrets(Vec::new()).end_graces().await;
        #[cfg(not(feature = "stripe"))]
        Ok(0)
    }

    /// Forgets what this node holds of `tenant` (and that its id was unknown): its next
    /// request reads the directory again (after a plan change made on this node, or the
    /// tenant created, for example). Usage recorded so far is kept and billed; its leases go
    /// back at the next flush.
    pub fn invalidate_tenant(&self, tenant: &TenantId) {
        self.gate().invalidate_tenant(tenant);
    }

    /// Forgets an API key on this node (and that it was unknown): its next request reads the
    /// directory again.
    pub fn invalidate_key(&self, key: &[u8]) {
        self.gate().invalidate_key(key);
    }
}

/// The engine is told of directory changes made outside its lookups (webhooks, [`Admin`]): it
/// forgets the tenant, so the change applies at once on this node.
///
/// [`Admin`]: crate::admin::Admin
impl DirectoryEvents for Tollgate {
    fn tenant_changed(&self, tenant: &TenantId) {
        self.invalidate_tenant(tenant);
    }

    fn keys_added(&self) {
        self.gate().forget_unknown();
    }

    fn webhook_handled(&self, outcome: WebhookCount) {
        let totals = self.shared().totals();
        let tally = match outcome {
            WebhookCount::Applied => &totals.webhooks_applied,
            WebhookCount::Rejected => &totals.webhooks_rejected,
            WebhookCount::MeterError => &totals.meter_errors,
            WebhookCount::NotCredited => &totals.webhooks_not_credited,
            WebhookCount::ApiRefused => &totals.webhooks_api_refused,
            _ => &totals.webhooks_ignored,
        };
        tally.add(1);
    }

    fn recharge(&self, news: RechargeNews) -> Told<'_> {
        Box::pin(async move {
            let alert = match news {
                RechargeNews::Paid { tenant, meter, n, invoice, amount_paid, currency, first } => {
                    let event = crate::engine::alerts::RechargeEvent::Recharged { n, invoice, amount_paid, currency };
                    Some(self.recharge_paid(tenant, meter, event, first))
                }
                RechargeNews::Failed { tenant, meter, n, reason, off, first } => {
                    self.recharge_failed(tenant, meter, n, reason, off, first)
                }
                RechargeNews::ActionRequired { tenant, meter, n, invoice, url } => {
                    Some(self.recharge_action(tenant, meter, n, invoice, url))
                }
            };
            // Written before the webhook is answered: a node frozen or killed after its answer
            // would lose it, and nothing would tell it again (a 500 makes Stripe deliver it
            // again, and the store tells it again).
            let Some(alert) = alert else { return Ok(()) };
            self.alerts().write_recharges_now().await;
            match self.alerts().waiting(&alert) {
                false => Ok(()),
                true => Err(format!("the {} alert could not be written to the outbox", alert.event())),
            }
        })
    }

    fn tier_changed(&self, news: crate::base::TierNews) -> Told<'_> {
        Box::pin(async move {
            let crate::base::TierNews { tenant, ladder, from, to, paid, currency, changes } = news;
            let event = crate::engine::alerts::RechargeEvent::TierChanged { ladder, from, to, paid, currency, changes };
            let at = self.shared().clock().unix_secs();
            let alert =
                crate::engine::alerts::RechargeAlert { tenant, meter: crate::config::MeterId::from(""), event, at };
            if !self.alerts().recharge(alert.clone()) {
                return Err(format!(
                    "the {} alert could not be queued: too many alerts wait to be written",
                    alert.event()
                ));
            }
            // Written before the move (as a recharge's alert before the webhook's answer).
            self.alerts().write_recharges_now().await;
            match self.alerts().waiting(&alert) {
                false => Ok(()),
                true => Err(format!("the {} alert could not be written to the outbox", alert.event())),
            }
        })
    }

    fn meter_error(&self, from: i64, to: i64) {
        // In the background: the webhook is answered at once. One at a time: the windows of
        // reports that come meanwhile are queued (bounded: merged past the bound) and
        // reconciled after it. A report only: the events Stripe refused are lacking, and
        // sending them again before their cause is fixed would be refused again.
        if !self.exporter().after_meter_error(from, to) {
            tracing::debug!(from, to, "a reconciliation after a meter error report is under way: queued");
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            // A pass that panics must not leave the queue held for good.
            struct Running(Tollgate);
            impl Drop for Running {
                fn drop(&mut self) {
                    if std::thread::panicking() {
                        self.0.exporter().meter_errors_abandoned();
                    }
                }
            }
            let guard = Running(engine);
            let engine = &guard.0;
            loop {
                let Some((from, to)) = engine.exporter().next_meter_error() else { return };
                // Once the window has settled (export.reconcile_after), or its hours are skipped.
                let after = engine.shared().runtime().load().config.export.reconcile_after.as_secs() as i64;
                let wait = (to + after + 60 - engine.shared().clock().unix_secs()).clamp(0, 2 * 3600);
                tokio::time::sleep(std::time::Duration::from_secs(wait.unsigned_abs())).await;
                let request = crate::engine::ReconcileRequest::new(from - 26 * 3600, to + 3600);
                match engine.reconcile(&request).await {
                    Ok(r) => tracing::warn!(
                        from,
                        to,
                        lacking_units = r.lacking_units,
                        surplus_units = r.surplus_units,
                        hours = r.drift.len() + r.more_drift,
                        "reconciled the hours around Stripe's meter error report"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not reconcile the hours of Stripe's meter error report")
                    }
                }
            }
        });
    }
}
