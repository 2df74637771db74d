//! The move of a tenant of the directory to the tier its payments unlock (`[tiers.NAME]`):
//! made once across a fleet, with its alert; the Stripe webhook's and the engine's daily
//! check's (`Tollgate::check_tiers`). It reads the quota role's payments
//! ([`PaymentCall::Read`]) and writes the directory role's tenant.

use super::PaymentCall;

/// Moves `record`'s tenant (tiers, `[tiers.NAME]`: the Stripe webhook's and the daily
/// check's, `Tollgate::check_tiers`) to the tier its payments unlock at `now`, if its plan is on
/// a ladder (down only for a `reversal`, on a ladder that moves down). Each attempt reads the
/// tenant's standing from `quota` afresh (a refund or dispute recorded meanwhile counts), writes
/// the `tenant.tier_changed` alert (named by the move and the version of the payments it read:
/// one per move, however often it is decided on them), then the plan, on the condition that the
/// tenant is as read (read again, and decided again, when it changed meanwhile); then every node
/// is told. A move made while the payments changed is decided again on them, as a reversal when
/// what was paid went down (a chargeback racing a payment leaves the tier the chargeback allows).
/// A tenant whose tier an operator pinned ([`PaymentCall::Pin`]) is not moved. Returns each
/// move it made, from and to, in order (what the audit records; the last is where it is). `Err`: what failed (the move is tried again by the next
/// delivery or the daily check).
pub(crate) async fn climb(
    quota: &dyn super::QuotaStore,
    directory: &dyn super::DirectoryStore,
    node: &dyn crate::base::DirectoryEvents,
    config: &crate::config::Config,
    mut record: super::TenantRecord,
    now: i64,
    mut reversal: bool,
) -> Result<Vec<(crate::base::PlanId, crate::base::PlanId)>, String> {
    let read = PaymentCall::Read { tenant: record.id.clone() };
    let mut moved = Vec::new();
    for _ in 0..4 {
        let Some(ladder) = config.tier_of(&record.plan) else { return Ok(moved) };
        let answer = quota.payments(&read, now).await.map_err(|e| e.to_string())?;
        if answer.pinned.is_some() {
            // An operator pinned its tier: no payment or check moves it.
            return Ok(moved);
        }
        let standing = answer.standing;
        let Some(to) = ladder.move_of(&record.plan, standing, now, reversal).cloned() else { return Ok(moved) };
        let news = crate::base::TierNews {
            tenant: record.id.clone(),
            ladder: ladder.name().to_owned(),
            from: record.plan.clone(),
            to: to.clone(),
            paid: standing.paid,
            currency: config.billing().currency.clone().unwrap_or_default(),
            changes: answer.changes,
        };
        node.tier_changed(news).await?;
        let update = super::TenantUpdate::Plan(record.id.clone(), to.clone());
        if directory.update_tenant(&update, super::UpdateWhen::Unchanged(&record)).await.map_err(|e| e.to_string())? {
            tracing::info!(tenant = %record.id, from = %record.plan, %to, paid = standing.paid,
                "a tenant moved to the tier its payments unlock");
            super::tell_changed(directory, &record.id, now.saturating_mul(1_000)).await;
            node.tenant_changed(&record.id);
            moved.push((record.plan.clone(), to.clone()));
            // Its payments changed while it moved (another delivery racing this one): decided
            // again on them.
            let after = quota.payments(&read, now).await.map_err(|e| e.to_string())?;
            if after.changes == answer.changes {
                return Ok(moved);
            }
            reversal |= after.standing.paid < standing.paid;
        }
        match directory.tenant(&record.id).await.map_err(|e| e.to_string())? {
            Some(again) => record = again,
            None => return Ok(moved),
        }
    }
    Err(format!("tenant {} kept changing while its tier moved", record.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::TenantId;
    use crate::store::{DisputeStep, PaymentOutcome};

    const T: i64 = 1_773_489_600;

    /// Tells nothing, and records a chargeback of the whole `pi_1` in the ledger when a move is
    /// decided: a dispute's webhook landing between a payment's decision and its move.
    #[derive(Debug)]
    struct ChargedBack(std::sync::Arc<crate::store::MemoryStore>);

    impl crate::base::DirectoryEvents for ChargedBack {
        fn tenant_changed(&self, _: &TenantId) {}
        fn webhook_handled(&self, _: crate::base::WebhookCount) {}
        fn tier_changed(&self, news: crate::base::TierNews) -> crate::base::Told<'_> {
            Box::pin(async move {
                if news.to.as_str() == "tier2" {
                    let call = PaymentCall::Dispute {
                        tenant: news.tenant,
                        payment: "pi_1".into(),
                        dispute: "dp_1".into(),
                        amount: 6_000,
                        step: DisputeStep::Withdrawn,
                        at: T,
                    };
                    crate::store::QuotaStore::payments(&*self.0, &call, T).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        }
    }

    /// A chargeback that lands while a payment's move is made is counted: the move is decided
    /// again on the payments as they are, and a ladder that moves down leaves the tier the
    /// chargeback allows (before, the move was made on what had been read, and stayed).
    #[tokio::test]
    async fn a_chargeback_racing_a_move_leaves_the_tier_it_allows() {
        use crate::store::{DirectoryStore, QuotaStore};
        let config = crate::config::Config::from_toml_str(
            "[billing]\ncurrency = \"usd\"\n[plans.free]\n[plans.tier1]\n[plans.tier2]\n[tiers.api]\n\
             order = [\"free\", \"tier1\", \"tier2\"]\ntier1 = { paid = \"5.00\" }\ntier2 = { paid = \"50.00\" }\n\
             downgrade = true\n",
        )
        .unwrap();
        let store = std::sync::Arc::new(crate::store::MemoryStore::new());
        let acme = crate::store::TenantRecord::new("t".into(), "tier1".into());
        store.put_tenant(&acme, &[]).await.unwrap();
        let paid = PaymentCall::Record {
            tenant: "t".into(),
            payment: "pi_1".into(),
            amount: 6_000,
            currency: "usd".into(),
            billing: "usd".into(),
            at: T,
        };
        assert_eq!(store.payments(&paid, T).await.unwrap().outcome, PaymentOutcome::Applied);
        let events = ChargedBack(store.clone());
        let moved = climb(&*store, &*store, &events, &config, acme, T, false).await.unwrap();
        let last = moved.last().map(|(_, to)| to.as_str());
        assert_eq!(last, Some("free"), "up to tier 2, then down: {moved:?}");
        let now = store.tenant(&"t".into()).await.unwrap().unwrap();
        assert_eq!(now.plan.as_str(), "free", "nothing paid is left: the first tier");
    }
}
