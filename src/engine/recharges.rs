//! The engine's recharge verbs (docs/credits.md, "Recharge"): a tenant's settings, and the
//! delivery of the recharges this node claimed. The settings' rules are a tenant's settings
//! (`settings/recharge.rs`); the claims and their delivery the recharge part's (`recharge/`).

use std::sync::Arc;

use crate::{
    base::{MeterId, TenantId},
    billing::Charger,
    engine::{
        alerts::{RechargeAlert, RechargeEvent},
        recharge::deliver,
        Tollgate,
    },
    metrics::RechargeOutcome,
    settings::recharge as settings,
};

impl Tollgate {
    /// The parts a recharge setting uses.
    fn recharge_parts<'a>(
        &'a self,
        config: &'a crate::config::Config,
        stores: &'a crate::store::Roles,
    ) -> settings::Parts<'a> {
        settings::Parts {
            quota: stores.quota.as_ref(),
            directory: stores.directory.as_ref(),
            config,
            charger: self.recharges().charger(),
        }
    }

    /// `tenant`'s recharge of `meter`: its plan's bounds and what the store keeps (its own
    /// settings, the recharge open, failures, the month's spending).
    ///
    /// # Errors
    /// An unknown tenant, a plan that recharges nothing on `meter`, a store that failed.
    pub async fn recharge(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
    ) -> Result<settings::RechargeView, settings::RechargeError> {
        let config = self.shared().runtime().load().config.clone();
        let stores = self.shared().stores().background();
        let now = self.shared().clock().unix_secs();
        settings::recharge(&self.recharge_parts(&config, stores), tenant, meter, settings::RechargeAct::Read, now).await
    }

    /// Turns `tenant`'s recharge of `meter` on with its own values within its plan's bounds
    /// (`ask`: each value left out is the plan's), or off (`None`). Turning it on again after
    /// failures turned it off is this call. The price's amount is read from Stripe (kept with
    /// the setting). Every node's next refill of the balance watches the new setting.
    ///
    /// # Errors
    /// As [`recharge`](Self::recharge); a value outside the plan's bounds
    /// ([`RechargeError::Invalid`](settings::RechargeError::Invalid)); the price not readable
    /// ([`RechargeError::Price`](settings::RechargeError::Price)). Nothing is stored then.
    pub async fn set_recharge(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        ask: Option<settings::RechargeAsk>,
    ) -> Result<settings::RechargeView, settings::RechargeError> {
        let operator = crate::store::Actor::Operator(crate::store::DEFAULT_OPERATOR.to_owned());
        self.set_recharge_by(tenant, meter, ask, settings::SetBy::Operator, operator).await
    }

    /// [`set_recharge`](Self::set_recharge) by `by` (the tenant's route turns it on only on a
    /// plan that lets it), recorded in the audit as made by `actor`.
    pub(crate) async fn set_recharge_by(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        ask: Option<settings::RechargeAsk>,
        by: settings::SetBy,
        actor: crate::store::Actor,
    ) -> Result<settings::RechargeView, settings::RechargeError> {
        let config = self.shared().runtime().load().config.clone();
        let stores = self.shared().stores().background();
        let now = self.shared().clock().unix_secs();
        let parts = self.recharge_parts(&config, stores);
        let before = settings::recharge(&parts, tenant, meter, settings::RechargeAct::Read, now).await;
        let act = ask.map_or(settings::RechargeAct::Off, |ask| settings::RechargeAct::Set(ask, by));
        let view = settings::recharge(&parts, tenant, meter, act, now).await?;
        let before = crate::settings::before_text(before, crate::settings::recharge_text);
        let after = crate::settings::recharge_text(&view);
        self.record_change(tenant, actor, crate::store::Setting::Recharge, before, after).await;
        Ok(view)
    }

    /// Delivers the recharges this node claimed (the worker calls it as they come; a front
    /// door whose process is frozen between invocations, after each): each is charged through
    /// Stripe, once per recharge, and its units granted by `invoice.paid`. Returns how many
    /// were delivered (paid or failed).
    pub async fn deliver_recharges(&self) -> usize {
        let recharges = self.recharges().clone();
        let config = self.shared().runtime().load().config.clone();
        let stores = self.shared().stores().background();
        let mut delivered = 0;
        while let Some(claim) = recharges.next() {
            let parts = deliver::Parts {
                quota: stores.quota.as_ref(),
                directory: stores.directory.as_ref(),
                usage: stores.usage.as_ref(),
                config: &config,
                charger: recharges.charger(),
                now: self.shared().clock().unix_secs(),
            };
            match deliver::deliver(&parts, &claim).await {
                deliver::Delivered::Paid { invoice, claimed_at } => {
                    tracing::info!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, packs = claim.packs,
                        "recharge paid; its units are granted by invoice.paid");
                    self.shared().totals().recharge(RechargeOutcome::Charged);
                    delivered += 1;
                    // Found paid long after its claim (taken again, still open): its
                    // `invoice.paid` did not come. Credited here, as that event would.
                    if parts.now.saturating_sub(claimed_at) >= crate::store::CREDIT_UNANNOUNCED_SECS {
                        self.credit_unannounced(&claim, &invoice).await;
                    }
                }
                deliver::Delivered::Processing => {
                    self.shared().totals().recharge(RechargeOutcome::Charged);
                    delivered += 1;
                }
                deliver::Delivered::Failed { why, off, first, action } => {
                    tracing::warn!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, reason = why.as_str(), off,
                        "recharge failed");
                    self.recharge_failed(claim.tenant.clone(), claim.meter.clone(), claim.n, why.as_str(), off, first);
                    if let (Some((invoice, url)), true) = (action, first) {
                        self.recharge_action(claim.tenant.clone(), claim.meter.clone(), claim.n, invoice, url);
                    }
                    delivered += 1;
                }
                deliver::Delivered::Closed => {}
                deliver::Delivered::Retry(why) => {
                    tracing::warn!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, error = %why,
                        "recharge not delivered; taken again once its claim lapses (10 minutes)");
                }
            }
        }
        // Their alerts (recharge turned off) written now: a front door frozen after its
        // invocation flushes before this.
        if delivered > 0 {
            self.alerts().write_recharges_now().await;
        }
        delivered
    }

    /// Recharge `claim`'s `invoice`, found paid [`CREDIT_UNANNOUNCED_SECS`](crate::store::CREDIT_UNANNOUNCED_SECS) or more after its
    /// claim with the claim still open: `invoice.paid` never came (the endpoint is not
    /// subscribed to it, or was down past Stripe's 3 days). Credited through the top-up path
    /// (the grant's id is the invoice's: the event, if it comes after all, is a duplicate),
    /// which closes the recharge; counted and logged at error level, for the endpoint to be
    /// mended.
    #[cfg(feature = "stripe")]
    async fn credit_unannounced(&self, claim: &crate::engine::recharge::queue::Claimed, invoice: &str) {
        use crate::billing::WebhookOutcome;
        let Some(charger) = self.recharges().charger() else { return };
        let handler = self.webhook_handler_with_secrets(Vec::new()).with_reader(charger.reader());
        match handler.credit_paid_recharge(invoice).await {
            Some(WebhookOutcome::Credited { units, .. }) => {
                self.shared().totals().recharge(RechargeOutcome::CreditedUnannounced);
                tracing::error!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, %invoice, units,
                    "a recharge was paid and its invoice.paid never came: credited by the worker; subscribe the \
                     webhook endpoint to invoice.paid (docs/credits.md, \"Recharge\")");
            }
            // Paid within the hour: its `invoice.paid` may still come.
            None => {}
            outcome => {
                tracing::warn!(tenant = %claim.tenant, meter = %claim.meter, n = claim.n, %invoice, ?outcome,
                    "a recharge found paid long after its claim could not be credited by the worker; taken again");
            }
        }
    }

    #[cfg(not(feature = "stripe"))]
    #[allow(clippy::unused_async)]
    async fn credit_unannounced(&self, _: &crate::engine::recharge::queue::Claimed, _: &str) {}

    /// A failure of recharge `n` counted in the store (by this node's delivery or a webhook):
    /// counted here when this node counted it first; alerted once recharge is off (the alert's
    /// id names the recharge: told again, it is written once). The alert queued, if any.
    pub(crate) fn recharge_failed(
        &self,
        tenant: TenantId,
        meter: MeterId,
        n: u64,
        reason: &'static str,
        off: bool,
        first: bool,
    ) -> Option<RechargeAlert> {
        // A payment's failure; a stop (a price changed, a grant refused, a refund, a dispute)
        // is no failure of a payment, and is only alerted.
        if first && crate::store::RechargeFailure::PAYMENT.iter().any(|f| f.as_str() == reason) {
            self.shared().totals().recharge(RechargeOutcome::Failed);
        }
        off.then(|| {
            let at = self.shared().clock().unix_secs();
            let alert = RechargeAlert { tenant, meter, event: RechargeEvent::Failed { n, reason }, at };
            self.alerts().recharge(alert.clone());
            alert
        })
    }

    /// Recharge `n`'s payment waits for the customer (3-D Secure): its invoice left open at
    /// `url`, told once (the alert's id names the recharge). The alert queued.
    pub(crate) fn recharge_action(
        &self,
        tenant: TenantId,
        meter: MeterId,
        n: u64,
        invoice: String,
        url: String,
    ) -> RechargeAlert {
        let at = self.shared().clock().unix_secs();
        let alert = RechargeAlert { tenant, meter, event: RechargeEvent::ActionRequired { n, invoice, url }, at };
        self.alerts().recharge(alert.clone());
        alert
    }

    /// Recharge `n`'s `invoice.paid` closed it (a webhook on this node; `first`: closed by
    /// it, else told again): counted once, alerted (the alert's id names the recharge). The
    /// alert queued.
    pub(crate) fn recharge_paid(
        &self,
        tenant: TenantId,
        meter: MeterId,
        event: RechargeEvent,
        first: bool,
    ) -> RechargeAlert {
        if first {
            self.shared().totals().recharge(RechargeOutcome::Paid);
        }
        let at = self.shared().clock().unix_secs();
        let alert = RechargeAlert { tenant, meter, event, at };
        self.alerts().recharge(alert.clone());
        alert
    }

    /// What charges this engine's recharges, if anything.
    pub(crate) fn recharge_charger(&self) -> Option<Arc<Charger>> {
        self.recharges().charger_arc()
    }

    /// [`deliver_recharges`](Self::deliver_recharges) within `budget` (a front door whose
    /// process is frozen after each invocation): a delivery cut short is taken again by a
    /// refill once its claim lapses, under the same keys.
    pub async fn deliver_recharges_within(&self, budget: std::time::Duration) -> usize {
        tokio::time::timeout(budget, self.deliver_recharges()).await.unwrap_or(0)
    }

    /// Waits until this node claimed a recharge to deliver.
    pub(crate) async fn recharge_claimed(&self) {
        self.recharges().queued().await;
    }
}
