//! A tenant's recharge, as alerts tell it (docs/credits.md, "Recharge"): paid
//! (`balance.recharged`), turned off by payment failures (`balance.recharge_failed`), stopped
//! by the month's limit (`balance.recharge_limit_reached`). Each is named by what it is about
//! (the recharge's number, or the month), so however many nodes and webhook deliveries tell
//! it, the fleet's outbox holds one row per destination.

use crate::base::{MeterId, PlanId, TenantId};

/// What happened to a tenant's recharge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RechargeEvent {
    /// Recharge `n`'s invoice is paid: its units granted.
    Recharged { n: u64, invoice: String, amount_paid: u64, currency: String },
    /// Recharge `n`'s payment failed, the last of failures in a row: recharge is off.
    Failed { n: u64, reason: &'static str },
    /// The month (its first second, UTC) whose limit stopped a recharge.
    LimitReached { month: i64 },
    /// Recharge `n`'s payment waits for the customer (3-D Secure): its invoice, left open,
    /// and the page where they pay it.
    ActionRequired { n: u64, invoice: String, url: String },
    /// The tenant moved from one plan of its ladder to another (`[tiers.NAME]`), having paid
    /// `paid` (net, smallest units of `currency`). Not a recharge's, and of no meter: it shares
    /// the recharges' queue, which writes what a webhook tells before its answer.
    TierChanged { ladder: String, from: PlanId, to: PlanId, paid: u64, currency: String, changes: u64 },
}

/// A recharge's alert, waiting to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RechargeAlert {
    pub(crate) tenant: TenantId,
    pub(crate) meter: MeterId,
    pub(crate) event: RechargeEvent,
    /// When it was seen (engine clock, Unix seconds).
    pub(crate) at: i64,
}

fn time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

impl RechargeAlert {
    /// Its event type (a documented, versioned schema each: docs/alerts.schema.json).
    pub(crate) fn event(&self) -> &'static str {
        match self.event {
            RechargeEvent::Recharged { .. } => "balance.recharged",
            RechargeEvent::Failed { .. } => "balance.recharge_failed",
            RechargeEvent::LimitReached { .. } => "balance.recharge_limit_reached",
            RechargeEvent::ActionRequired { .. } => "balance.recharge_action_required",
            RechargeEvent::TierChanged { .. } => "tenant.tier_changed",
        }
    }

    /// What it is about: the recharge's number, or the month.
    pub(super) fn about(&self) -> String {
        match &self.event {
            RechargeEvent::Recharged { n, .. }
            | RechargeEvent::Failed { n, .. }
            | RechargeEvent::ActionRequired { n, .. } => format!("recharge:{n}"),
            RechargeEvent::LimitReached { month } => format!("month:{month}"),
            // One per move and version of the tenant's payments: decided again on the same
            // payments (a redelivery, every node's daily check, two deliveries racing) it is the
            // same alert; the same move made again later, after a payment, refund or dispute
            // changed them, is another.
            RechargeEvent::TierChanged { ladder, from, to, changes, .. } => {
                format!("tier:{ladder}:{from}:{to}:v{changes}")
            }
        }
    }

    /// Its JSON body (schema version 1), the tenant being on `plan`.
    pub(crate) fn body(&self, plan: &PlanId) -> String {
        let mut data = serde_json::json!({
            "version": 1,
            "tenant": self.tenant.as_str(),
            "plan": plan.as_str(),
            "meter": self.meter.as_str(),
        });
        match &self.event {
            RechargeEvent::Recharged { n, invoice, amount_paid, currency } => {
                data["recharge"] = (*n).into();
                data["invoice"] = invoice.as_str().into();
                data["amount_paid"] = crate::base::money_text(*amount_paid, currency).into();
                data["currency"] = currency.as_str().into();
            }
            RechargeEvent::Failed { n, reason } => {
                data["recharge"] = (*n).into();
                data["reason"] = (*reason).into();
                if crate::store::RechargeFailure::PAYMENT.iter().any(|f| f.as_str() == *reason) {
                    data["failures"] = crate::store::FAILURES_BEFORE_OFF.into();
                }
            }
            RechargeEvent::LimitReached { month } => {
                data["month"] = time(*month).get(..7).unwrap_or_default().into();
            }
            RechargeEvent::ActionRequired { n, invoice, url } => {
                data["recharge"] = (*n).into();
                data["invoice"] = invoice.as_str().into();
                data["action_url"] = url.as_str().into();
            }
            RechargeEvent::TierChanged { ladder, from, to, paid, currency, .. } => {
                if let Some(d) = data.as_object_mut() {
                    d.remove("meter");
                }
                data["plan"] = to.as_str().into();
                data["ladder"] = ladder.as_str().into();
                data["from"] = from.as_str().into();
                data["to"] = to.as_str().into();
                data["paid"] = crate::base::money_text(*paid, currency).into();
                data["currency"] = currency.as_str().into();
            }
        }
        serde_json::json!({ "type": self.event(), "timestamp": time(self.at), "data": data }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(event: RechargeEvent) -> RechargeAlert {
        RechargeAlert { tenant: "acme".into(), meter: "tokens".into(), event, at: 1_773_489_600 }
    }

    #[test]
    fn a_recharge_alert_is_named_by_its_recharge_or_month_and_has_a_body_of_schema_1() {
        let paid = |invoice: &str| {
            alert(RechargeEvent::Recharged { n: 3, invoice: invoice.into(), amount_paid: 2000, currency: "usd".into() })
        };
        assert_eq!(paid("in_1").id("ns"), paid("in_2").id("ns"), "the recharge names it");
        let failed = alert(RechargeEvent::Failed { n: 3, reason: "declined" });
        assert_ne!(paid("in_1").id("ns"), failed.id("ns"), "another event of the same recharge");
        assert_ne!(paid("in_1").id("ns"), paid("in_1").id("other"), "per deployment");
        let body: serde_json::Value = serde_json::from_str(&paid("in_1").body(&"pro".into())).unwrap();
        assert_eq!(body["type"], "balance.recharged");
        assert_eq!(body["timestamp"], "2026-03-14T12:00:00Z");
        assert_eq!(body["data"]["version"], 1);
        assert_eq!((body["data"]["recharge"].as_u64(), body["data"]["amount_paid"].as_str()), (Some(3), Some("20.00")));
        let body: serde_json::Value = serde_json::from_str(&failed.body(&"pro".into())).unwrap();
        assert_eq!((body["data"]["reason"].as_str(), body["data"]["failures"].as_u64()), (Some("declined"), Some(3)));
        let month = alert(RechargeEvent::LimitReached { month: 1_772_323_200 });
        let body: serde_json::Value = serde_json::from_str(&month.body(&"pro".into())).unwrap();
        assert_eq!(
            (body["type"].as_str(), body["data"]["month"].as_str()),
            (Some("balance.recharge_limit_reached"), Some("2026-03"))
        );
        let next = alert(RechargeEvent::LimitReached { month: 1_775_001_600 });
        assert_ne!(month.id("ns"), next.id("ns"), "each month once");
        // Pinned: nodes of every version name a recharge's alert alike.
        assert_eq!(paid("in_1").id("ns"), "alert_99d7b0bac43091c217062236b9c79708");
        assert_eq!(failed.id("ns"), "alert_3841a37bddcb9dc7a6f6b1009b2e43f6");
        assert_eq!(month.id("ns"), "alert_c8fe08912a86581aefbe8863b0c32d94");
    }

    #[test]
    fn a_tier_alert_names_its_move_and_has_no_meter() {
        let moved = |paid, changes| RechargeAlert {
            tenant: "acme".into(),
            meter: "".into(),
            event: RechargeEvent::TierChanged {
                ladder: "api".into(),
                from: "tier1".into(),
                to: "tier2".into(),
                paid,
                currency: "usd".into(),
                changes,
            },
            at: 1_773_489_600,
        };
        assert_eq!(moved(5_000, 2).id("ns"), moved(5_000, 2).id("ns"), "told again: the same alert");
        assert_ne!(moved(5_000, 2).id("ns"), moved(5_000, 4).id("ns"), "the same move made again later: another");
        let body: serde_json::Value = serde_json::from_str(&moved(5_000, 2).body(&"tier1".into())).unwrap();
        assert_eq!(body["type"], "tenant.tier_changed");
        let data = &body["data"];
        assert!(data.get("meter").is_none(), "{data}");
        assert_eq!(
            (data["plan"].as_str(), data["from"].as_str(), data["to"].as_str(), data["paid"].as_str()),
            (Some("tier2"), Some("tier1"), Some("tier2"), Some("50.00"))
        );
        assert_eq!((data["ladder"].as_str(), data["currency"].as_str()), (Some("api"), Some("usd")));
    }
}
