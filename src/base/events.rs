//! What a change of the directory made outside the engine tells the node that made it.

use super::{MeterId, PlanId, TenantId};

/// Told by whoever changes the directory outside the engine's own lookups (a Stripe webhook, an
/// administration call), so that the node that made the change serves it at once. The other
/// nodes see a change of the directory's records within a second when the writer also tells
/// the directory's feed of tenants changed (`store::ChangeCall`: `Admin` and the webhooks' plan
/// changes do), else within `limits.directory_ttl`.
///
/// [`Tollgate`](crate::Tollgate) implements it. Parts that change the directory take an
/// `Arc<dyn DirectoryEvents>` instead of the engine, so they do not depend on it.
pub trait DirectoryEvents: Send + Sync + std::fmt::Debug + 'static {
    /// The tenant's record changed in the directory (its plan, customer or overrides): forget
    /// what this node holds of it, so that its next request reads the directory again.
    fn tenant_changed(&self, tenant: &TenantId);

    /// API keys were added to the directory (imported, by their hashes): forget the
    /// credentials this node remembers as unknown, so that a client refused before its key was
    /// added is served at once. Nothing by default.
    fn keys_added(&self) {}

    /// A Stripe webhook delivery ended this way: counted in the engine's totals and metrics.
    fn webhook_handled(&self, outcome: WebhookCount);

    /// Stripe reported meter events it refused after taking them (a thin meter error event),
    /// validated between `from` and `to` (Unix seconds): the engine reconciles the hours
    /// around them (a report; nothing is sent). Nothing by default.
    fn meter_error(&self, from: i64, to: i64) {
        let _ = (from, to);
    }

    /// A Stripe webhook closed or failed a tenant's recharge (docs/credits.md, "Recharge"):
    /// counted, and its alert written to the outbox (`balance.recharged`;
    /// `balance.recharge_failed` once recharge is off) before the webhook is answered. `Err`:
    /// the alert could not be written, and the webhook answers 500 so that Stripe delivers it
    /// again (the store tells the recharge's news again, `first` no more). Nothing by default.
    fn recharge(&self, news: RechargeNews) -> Told<'_> {
        let _ = news;
        Box::pin(std::future::ready(Ok(())))
    }

    /// A tenant moved to another tier of its ladder (`[tiers.NAME]`): its
    /// `tenant.tier_changed` alert written to the outbox before the move is written (one per
    /// move and payments read, however often it is told). `Err`: the alert could not be written, and the move is
    /// not made (a webhook answers 500; the daily check tries again). Nothing by default.
    fn tier_changed(&self, news: TierNews) -> Told<'_> {
        let _ = news;
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A tenant moved to another tier of its ladder ([`DirectoryEvents::tier_changed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierNews {
    /// The tenant.
    pub tenant: TenantId,
    /// Its ladder (`[tiers.NAME]`).
    pub ladder: String,
    /// The plan it was on.
    pub from: PlanId,
    /// The plan it moves to.
    pub to: PlanId,
    /// What it has paid, net, in the billing currency's smallest unit.
    pub paid: u64,
    /// The billing currency (its ISO code).
    pub currency: String,
    /// How many changes of its payments the move was decided on (the ledger row's version,
    /// [`PaymentAnswer::changes`](crate::store::PaymentAnswer::changes)): the alert's id names
    /// the move and it, so the same move decided again on the same payments is one alert.
    pub changes: u64,
}

/// What telling the engine a recharge's news came to ([`DirectoryEvents::recharge`]): `Err`
/// says why its alert was not written.
pub type Told<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// What a Stripe webhook did to a tenant's recharge ([`DirectoryEvents::recharge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RechargeNews {
    /// Recharge `n`'s invoice is paid (`invoice.paid`): the recharge is closed, its units
    /// granted.
    Paid {
        /// The tenant.
        tenant: TenantId,
        /// The prepaid meter.
        meter: MeterId,
        /// The recharge's number.
        n: u64,
        /// Its invoice.
        invoice: String,
        /// What was paid, in the currency's smallest unit (`amount_paid`).
        amount_paid: u64,
        /// The invoice's currency (lowercase ISO code).
        currency: String,
        /// Closed by this delivery (else told again: a redelivery, or a retry after the
        /// alert could not be written).
        first: bool,
    },
    /// Recharge `n`'s payment failed (`invoice.payment_failed`,
    /// `invoice.payment_action_required`), a failure counted.
    Failed {
        /// The tenant.
        tenant: TenantId,
        /// The prepaid meter.
        meter: MeterId,
        /// The recharge's number.
        n: u64,
        /// Why, as the store keeps it (`declined`, `action_required`, `no_payment_method`,
        /// `refused`): the reason that turned recharge off when `off`.
        reason: &'static str,
        /// Recharge is off since (the last failure in a row).
        off: bool,
        /// Counted by this delivery (a repeat of a failure already counted: `false`).
        first: bool,
    },
    /// Recharge `n`'s payment waits for the customer (3-D Secure,
    /// `invoice.payment_action_required`): its invoice stays open for them to pay at `url`.
    ActionRequired {
        /// The tenant.
        tenant: TenantId,
        /// The prepaid meter.
        meter: MeterId,
        /// The recharge's number.
        n: u64,
        /// The recharge's Stripe invoice.
        invoice: String,
        /// Its `hosted_invoice_url`.
        url: String,
    },
}

/// How a webhook delivery is counted ([`DirectoryEvents::webhook_handled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebhookCount {
    /// Its effect was applied.
    Applied,
    /// Refused: a bad signature or body.
    Rejected,
    /// Verified, and nothing to do (a duplicate, an older event, an ignored kind).
    Ignored,
    /// A verified meter error event from Stripe (events it refused after taking them).
    MeterError,
    /// A verified payment that granted no credits: none of its paid lines is on a credit
    /// price.
    NotCredited,
    /// A payment whose details Stripe refused to read for the key (401, 403, 404): answered
    /// 500, delivered again once the key can read them.
    ApiRefused,
}
