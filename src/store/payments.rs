//! The quota role's payments: what the store has seen paid for each tenant, net of refunds and
//! disputes, and since when it has paid: the money tiers of plans unlocked by payment count.
//!
//! Each tenant has one row, changed by one atomic read-modify-write with the rules of
//! [`PaymentRow::apply`], written once here; every store keeps the row as it is (a JSON
//! document, as the directory's feed is).
//!
//! - **Once per payment.** A payment is keyed by its payment intent (`pi_…`), else its charge
//!   (`ch_…`), else (an invoice paid out of band) its invoice: the ids refunds and disputes
//!   name. However often its webhook is delivered, it counts once.
//! - **Refunds** are Stripe's running total of the charge (`amount_refunded`): a redelivery,
//!   or an older total delivered late, takes nothing more.
//! - **Disputes** count once per dispute id: its funds withdrawn take its amount, its funds
//!   reinstated give it back, in whichever order they arrive.
//! - **A reversal before its payment** (webhooks are not ordered) is kept until the payment
//!   lands, at most [`ORPHANS_KEPT`] of them: past them the oldest is let go (most likely a
//!   refund of a payment made before the ledger began, whose payment never comes).
//! - **The billing currency alone** counts: a payment in another is answered
//!   [`PaymentOutcome::OtherCurrency`] and not kept.
//! - **Since when**: the earliest payment that still counts (its net above zero). A payment
//!   refunded or charged back in full does not start the clock.
//! - **Bounded**: at most [`PAYMENTS_KEPT`] payments one by one, each for
//!   [`PAYMENT_KEPT_SECS`] after it was paid (past Stripe's windows for refunds and disputes);
//!   older ones are folded into the row's total. A payment at or before the newest one folded
//!   that the row does not keep is [`PaymentOutcome::Stale`]: it may be one folded, so it is
//!   not counted again. A reversal of a payment folded is not taken (the row no longer knows
//!   what it took): a tenant with more than [`PAYMENTS_KEPT`] payments in 400 days keeps the
//!   older ones' refunds counted as paid. Ids are at most [`PAYMENT_ID_MAX`] bytes; a payment
//!   keeps at most [`DISPUTES_KEPT`] disputes (Stripe allows one per charge): a fifth dispute
//!   of one payment answers [`PaymentOutcome::Full`] and changes nothing (the webhook logs it
//!   and goes on).
//! - **Changes are counted** ([`PaymentRow::changes`], in every answer): a tier's move is named
//!   by the tenant's plans and the count its decision read, so that the same move decided
//!   again on the same payments is one alert, and the same move made again later is another.

use serde::{Deserialize, Serialize};

use crate::base::{Standing, TenantId};

/// How many payments a tenant's row keeps one by one (older ones are folded into its total):
/// about 60 KB of JSON at most, within a DynamoDB item's 400 KB.
pub const PAYMENTS_KEPT: usize = 512;

/// How long a payment is kept one by one after it was paid: 400 days, past Stripe's windows
/// for refunds (180 days) and disputes (120 days, and the card networks' longest).
pub const PAYMENT_KEPT_SECS: i64 = 400 * 86_400;

/// How many disputes one payment keeps (Stripe opens at most one per charge).
pub const DISPUTES_KEPT: usize = 4;

/// How many reversals of payments the row has not seen yet it keeps (a refund whose payment's
/// webhook comes later), each until that payment lands or it is [`PAYMENT_KEPT_SECS`] old.
pub const ORPHANS_KEPT: usize = 64;

/// The longest payment or dispute id a row takes, in bytes (Stripe's are about 30).
pub const PAYMENT_ID_MAX: usize = 255;

/// A step of a dispute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisputeStep {
    /// Its funds were taken from the payment (`charge.dispute.funds_withdrawn`).
    Withdrawn,
    /// Its funds were given back (`charge.dispute.funds_reinstated`: the dispute was won).
    Reinstated,
}

/// A change to a tenant's payments, or a read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PaymentCall {
    /// A payment, counted once per id.
    Record {
        /// Whose.
        tenant: TenantId,
        /// Its payment intent's id, else its charge's, else its invoice's.
        payment: String,
        /// In the currency's smallest unit.
        amount: u64,
        /// Its ISO code, in any case.
        currency: String,
        /// The billing currency (`[billing] currency`): a payment in another is not counted.
        billing: String,
        /// When it was paid, Unix seconds.
        at: i64,
    },
    /// A refund of a payment: the payment's refunds become the larger of `refunded` and what
    /// they were.
    Refund {
        /// Whose.
        tenant: TenantId,
        /// The payment's id.
        payment: String,
        /// The charge's running total refunded (Stripe's `amount_refunded`).
        refunded: u64,
        /// When, Unix seconds.
        at: i64,
    },
    /// A step of a dispute of a payment, taken once per dispute id and step.
    Dispute {
        /// Whose.
        tenant: TenantId,
        /// The payment's id.
        payment: String,
        /// The dispute's id.
        dispute: String,
        /// What it takes, in the currency's smallest unit.
        amount: u64,
        /// Withdrawn or reinstated.
        step: DisputeStep,
        /// When, Unix seconds.
        at: i64,
    },
    /// Reads the row.
    Read {
        /// Whose.
        tenant: TenantId,
    },
    /// Pins the tenant's tier to `plan` (an operator's, `tollgate tenants set-tier`): no
    /// payment, refund or daily check moves it while pinned. `None` unpins it. At most
    /// [`PAYMENT_ID_MAX`] bytes.
    Pin {
        /// Whose.
        tenant: TenantId,
        /// The plan it is pinned to, or `None`.
        plan: Option<String>,
    },
}

impl PaymentCall {
    /// The tenant whose row the call changes or reads.
    #[must_use]
    pub fn tenant(&self) -> &TenantId {
        match self {
            Self::Record { tenant, .. }
            | Self::Refund { tenant, .. }
            | Self::Dispute { tenant, .. }
            | Self::Read { tenant }
            | Self::Pin { tenant, .. } => tenant,
        }
    }
}

/// A dispute a payment keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisputeMark {
    /// The dispute's id.
    pub id: String,
    /// What it takes while withdrawn and not reinstated.
    pub amount: u64,
    /// Its funds were withdrawn.
    #[serde(default)]
    pub withdrawn: bool,
    /// Its funds were reinstated.
    #[serde(default)]
    pub reinstated: bool,
}

/// One payment a row keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentEntry {
    /// The payment's id.
    pub id: String,
    /// Paid, in the currency's smallest unit (0 for an orphan: its payment not seen yet).
    pub amount: u64,
    /// When it was paid (an orphan: when its first reversal came), Unix seconds.
    pub at: i64,
    /// Refunded so far (the charge's running total).
    #[serde(default)]
    pub refunded: u64,
    /// Its disputes, at most [`DISPUTES_KEPT`].
    #[serde(default)]
    pub disputes: Vec<DisputeMark>,
}

impl PaymentEntry {
    fn new(id: &str, amount: u64, at: i64) -> Self {
        Self { id: id.to_owned(), amount, at, refunded: 0, disputes: Vec::new() }
    }

    /// Taken by its disputes withdrawn and not reinstated.
    #[must_use]
    pub fn disputed(&self) -> u64 {
        self.disputes.iter().filter(|d| d.withdrawn && !d.reinstated).fold(0, |sum, d| sum.saturating_add(d.amount))
    }

    /// What it counts: its amount less its refunds and disputes, never below zero.
    #[must_use]
    pub fn net(&self) -> u64 {
        self.amount.saturating_sub(self.refunded).saturating_sub(self.disputed())
    }
}

/// A tenant's payments: the row a store keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRow {
    /// What the payments no longer kept one by one count, net.
    #[serde(default)]
    pub folded: u64,
    /// The earliest of them that counted (net above zero), Unix seconds.
    #[serde(default)]
    pub folded_first_at: Option<i64>,
    /// When the newest of them was paid: a payment at or before it that the row does not keep
    /// may be one of them, and is not counted again.
    #[serde(default)]
    pub folded_through: Option<i64>,
    /// The payments kept one by one, oldest first.
    #[serde(default)]
    pub payments: Vec<PaymentEntry>,
    /// Reversals of payments not seen yet, applied once the payment lands.
    #[serde(default)]
    pub orphans: Vec<PaymentEntry>,
    /// How many calls changed the row (applied), ever: its version.
    #[serde(default)]
    pub changes: u64,
    /// The plan an operator pinned the tenant's tier to ([`PaymentCall::Pin`]), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
}

/// What a call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PaymentOutcome {
    /// The row changed.
    Applied,
    /// The call was applied before (a redelivered webhook, an older running total): nothing
    /// changed.
    Duplicate,
    /// A payment in another currency than the billing one: not counted.
    OtherCurrency,
    /// A payment at or before the newest one folded that the row does not keep: it may have
    /// been folded, so it is not counted again.
    Stale,
    /// The row cannot take this dispute without forgetting another (its payment's disputes
    /// are at [`DISPUTES_KEPT`]): nothing changed, and it is not counted.
    Full,
    /// Nothing to count: an amount of 0, or an id empty or longer than [`PAYMENT_ID_MAX`].
    Ignored,
    /// A read.
    Read,
}

/// A call's answer: what it did, and where the tenant stands after it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PaymentAnswer {
    /// What the call did.
    pub outcome: PaymentOutcome,
    /// The tenant's standing after it.
    pub standing: Standing,
    /// How many calls have changed the tenant's payments, after it ([`PaymentRow::changes`]).
    pub changes: u64,
    /// The plan its tier is pinned to, after it ([`PaymentCall::Pin`]).
    pub pinned: Option<String>,
    /// The row itself, on a [`PaymentCall::Read`] (bounded by its rules: at most
    /// [`PAYMENTS_KEPT`] payments and as many orphans): what the dashboard's money page lists.
    pub row: Option<PaymentRow>,
}

impl PaymentAnswer {
    /// An answer (of a row changed `0` times: see [`PaymentAnswer::with_changes`]).
    #[must_use]
    pub fn new(outcome: PaymentOutcome, standing: Standing) -> Self {
        Self { outcome, standing, changes: 0, pinned: None, row: None }
    }

    /// The answer, of a tier pinned to `plan`.
    #[must_use]
    pub fn with_pinned(mut self, plan: Option<String>) -> Self {
        self.pinned = plan;
        self
    }

    /// The answer, of a row changed `changes` times.
    #[must_use]
    pub fn with_changes(mut self, changes: u64) -> Self {
        self.changes = changes;
        self
    }
}

impl PaymentRow {
    /// What the tenant has paid, net of refunds and disputes.
    #[must_use]
    pub fn paid(&self) -> u64 {
        self.payments.iter().fold(self.folded, |sum, p| sum.saturating_add(p.net()))
    }

    /// When the earliest payment that still counts was paid.
    #[must_use]
    pub fn first_at(&self) -> Option<i64> {
        let kept = self.payments.iter().filter(|p| p.net() > 0).map(|p| p.at).min();
        match (kept, self.folded_first_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The tenant's standing.
    #[must_use]
    pub fn standing(&self) -> Standing {
        Standing::new(self.paid(), self.first_at())
    }

    /// Applies `call` at `now` (Unix seconds): the rules every store follows. A call that
    /// changes nothing leaves the row as it was (so a store need not write it).
    pub fn apply(&mut self, call: &PaymentCall, now: i64) -> PaymentOutcome {
        let too_long = |id: &str| id.is_empty() || id.len() > PAYMENT_ID_MAX;
        let outcome = match call {
            PaymentCall::Read { .. } => return PaymentOutcome::Read,
            PaymentCall::Pin { plan, .. } => {
                if plan.as_deref().is_some_and(too_long) {
                    return PaymentOutcome::Ignored;
                }
                if self.pinned == *plan {
                    return PaymentOutcome::Duplicate;
                }
                self.pinned.clone_from(plan);
                PaymentOutcome::Applied
            }
            PaymentCall::Record { payment, amount, currency, billing, at, .. } => {
                if too_long(payment) || *amount == 0 {
                    return PaymentOutcome::Ignored;
                }
                if self.payments.iter().any(|p| &p.id == payment) {
                    return PaymentOutcome::Duplicate;
                }
                let orphan = self.orphans.iter().position(|o| &o.id == payment);
                if !currency.eq_ignore_ascii_case(billing) {
                    // Not counted, nor what waited for it.
                    if let Some(i) = orphan {
                        self.orphans.remove(i);
                        return PaymentOutcome::OtherCurrency;
                    }
                    return PaymentOutcome::OtherCurrency;
                }
                if self.folded_through.is_some_and(|f| *at <= f) {
                    return PaymentOutcome::Stale;
                }
                let mut entry = PaymentEntry::new(payment, *amount, *at);
                // Reversals that came first.
                if let Some(i) = orphan {
                    let o = self.orphans.remove(i);
                    entry.refunded = o.refunded;
                    entry.disputes = o.disputes;
                }
                let place = self.payments.partition_point(|p| p.at <= *at);
                self.payments.insert(place, entry);
                PaymentOutcome::Applied
            }
            PaymentCall::Refund { payment, refunded, at, .. } => {
                if too_long(payment) {
                    return PaymentOutcome::Ignored;
                }
                let entry = self.entry_or_orphan(payment, *at);
                if *refunded <= entry.refunded {
                    return PaymentOutcome::Duplicate;
                }
                entry.refunded = *refunded;
                PaymentOutcome::Applied
            }
            PaymentCall::Dispute { payment, dispute, amount, step, at, .. } => {
                if too_long(payment) || too_long(dispute) {
                    return PaymentOutcome::Ignored;
                }
                // Seen (this step of this dispute) before any orphan is made for it.
                let seen = |e: &PaymentEntry| {
                    e.disputes.iter().find(|d| &d.id == dispute).is_some_and(|d| match step {
                        DisputeStep::Withdrawn => d.withdrawn,
                        DisputeStep::Reinstated => d.reinstated,
                    })
                };
                if self.payments.iter().chain(&self.orphans).any(|e| e.id == *payment && seen(e)) {
                    return PaymentOutcome::Duplicate;
                }
                let entry = self.entry_or_orphan(payment, *at);
                let mark = match entry.disputes.iter().position(|d| &d.id == dispute) {
                    Some(i) => &mut entry.disputes[i],
                    None if entry.disputes.len() >= DISPUTES_KEPT => {
                        self.drop_empty_orphan(payment);
                        return PaymentOutcome::Full;
                    }
                    None => {
                        entry.disputes.push(DisputeMark {
                            id: dispute.clone(),
                            amount: *amount,
                            withdrawn: false,
                            reinstated: false,
                        });
                        entry.disputes.last_mut().expect("just pushed")
                    }
                };
                match step {
                    DisputeStep::Withdrawn => mark.withdrawn = true,
                    DisputeStep::Reinstated => mark.reinstated = true,
                }
                PaymentOutcome::Applied
            }
        };
        if outcome == PaymentOutcome::Applied {
            self.changes = self.changes.saturating_add(1);
        }
        self.bound(now);
        outcome
    }

    /// The payment `id`, or the orphan that keeps its reversals until it lands (made here;
    /// the oldest orphan let go when they are at their bound: the likeliest to be a reversal
    /// of a payment made before the ledger began, which never comes).
    fn entry_or_orphan(&mut self, id: &str, at: i64) -> &mut PaymentEntry {
        if let Some(i) = self.payments.iter().position(|p| p.id == id) {
            return &mut self.payments[i];
        }
        if let Some(i) = self.orphans.iter().position(|p| p.id == id) {
            return &mut self.orphans[i];
        }
        while self.orphans.len() >= ORPHANS_KEPT {
            let oldest = (0..self.orphans.len()).min_by_key(|&i| self.orphans[i].at).unwrap_or(0);
            let gone = self.orphans.remove(oldest);
            tracing::warn!(payment = %gone.id, "tiers: a reversal waited for a payment that never came and the \
                reversals waiting are at their bound: the oldest let go");
        }
        self.orphans.push(PaymentEntry::new(id, 0, at));
        self.orphans.last_mut().expect("just pushed")
    }

    /// Drops the orphan of `id` if it holds nothing (made for a call that was then refused).
    fn drop_empty_orphan(&mut self, id: &str) {
        self.orphans.retain(|o| o.id != id || o.refunded > 0 || !o.disputes.is_empty());
    }

    /// Folds the payments past their keep time, and the oldest past [`PAYMENTS_KEPT`], into
    /// the total; drops the orphans past their keep time.
    fn bound(&mut self, now: i64) {
        let old = self.payments.iter().take_while(|p| now.saturating_sub(p.at) > PAYMENT_KEPT_SECS).count();
        let over = self.payments.len().saturating_sub(PAYMENTS_KEPT);
        for p in self.payments.drain(..old.max(over)) {
            let net = p.net();
            self.folded = self.folded.saturating_add(net);
            if net > 0 {
                self.folded_first_at = Some(self.folded_first_at.map_or(p.at, |f| f.min(p.at)));
            }
            self.folded_through = Some(self.folded_through.map_or(p.at, |f| f.max(p.at)));
        }
        self.orphans.retain(|o| now.saturating_sub(o.at) <= PAYMENT_KEPT_SECS);
    }
}

impl PaymentRow {
    /// Applies `call` at `now` to the row a store keeps as JSON (`None`: no row yet): the answer,
    /// and the row to write when it changed. A store does this inside one atomic
    /// read-modify-write (a transaction, a compare-and-set).
    ///
    /// # Errors
    /// [`StoreError::Unusable`](super::StoreError::Unusable) when the stored row cannot be read.
    pub fn apply_json(
        stored: Option<&str>,
        call: &PaymentCall,
        now: i64,
    ) -> Result<(PaymentAnswer, Option<String>), super::StoreError> {
        let mut row: PaymentRow = match stored {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| super::StoreError::Unusable(format!("a tenant's payments row cannot be read: {e}")))?,
            None => PaymentRow::default(),
        };
        let before = row.clone();
        let outcome = row.apply(call, now);
        let changed = row != before;
        let json = if changed {
            Some(serde_json::to_string(&row).map_err(|e| super::StoreError::Backend(Box::new(e)))?)
        } else {
            None
        };
        let mut answer =
            PaymentAnswer::new(outcome, row.standing()).with_changes(row.changes).with_pinned(row.pinned.clone());
        // A read hands the row over (moved, not copied: a tier's reads take it too).
        answer.row = matches!(call, PaymentCall::Read { .. }).then_some(row);
        Ok((answer, json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_773_489_600;
    const DAY: i64 = 86_400;

    fn record(id: &str, amount: u64, at: i64) -> PaymentCall {
        PaymentCall::Record {
            tenant: "t".into(),
            payment: id.into(),
            amount,
            currency: "USD".into(),
            billing: "usd".into(),
            at,
        }
    }

    fn refund(id: &str, refunded: u64, at: i64) -> PaymentCall {
        PaymentCall::Refund { tenant: "t".into(), payment: id.into(), refunded, at }
    }

    fn dispute(id: &str, dp: &str, amount: u64, step: DisputeStep) -> PaymentCall {
        PaymentCall::Dispute { tenant: "t".into(), payment: id.into(), dispute: dp.into(), amount, step, at: T }
    }

    #[test]
    fn a_payment_counts_once_and_its_refunds_as_their_running_total() {
        let mut row = PaymentRow::default();
        assert_eq!(row.apply(&record("pi_1", 500, T), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&record("pi_1", 500, T), T), PaymentOutcome::Duplicate, "redelivered");
        assert_eq!(row.apply(&record("pi_2", 4_500, T + 60), T + 60), PaymentOutcome::Applied);
        assert_eq!(row.standing(), Standing::new(5_000, Some(T)));
        assert_eq!(row.apply(&refund("pi_2", 1_000, T), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&refund("pi_2", 1_000, T), T), PaymentOutcome::Duplicate);
        assert_eq!(row.apply(&refund("pi_2", 1_500, T), T), PaymentOutcome::Applied, "a second refund: the total");
        assert_eq!(row.apply(&refund("pi_2", 1_000, T), T), PaymentOutcome::Duplicate, "an older total, late");
        assert_eq!(row.paid(), 3_500);
        let other = PaymentCall::Record {
            tenant: "t".into(),
            payment: "pi_3".into(),
            amount: 9,
            currency: "EUR".into(),
            billing: "usd".into(),
            at: T,
        };
        assert_eq!(row.apply(&other, T), PaymentOutcome::OtherCurrency);
        assert_eq!(row.apply(&record("pi_4", 0, T), T), PaymentOutcome::Ignored, "a trial's invoice of 0");
        assert_eq!(row.apply(&record(&"x".repeat(PAYMENT_ID_MAX + 1), 5, T), T), PaymentOutcome::Ignored);
        assert_eq!(row.paid(), 3_500);
        assert_eq!(row.payments.len(), 2);
    }

    #[test]
    fn a_dispute_takes_once_and_gives_back_once_in_either_order() {
        let mut row = PaymentRow::default();
        row.apply(&record("pi_1", 5_000, T), T);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 5_000, DisputeStep::Withdrawn), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 5_000, DisputeStep::Withdrawn), T), PaymentOutcome::Duplicate);
        assert_eq!(row.paid(), 0);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 5_000, DisputeStep::Reinstated), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 5_000, DisputeStep::Reinstated), T), PaymentOutcome::Duplicate);
        assert_eq!(row.paid(), 5_000);

        // Won, its reinstatement delivered first: the withdrawal after it takes nothing.
        let mut row = PaymentRow::default();
        row.apply(&record("pi_1", 5_000, T), T);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 5_000, DisputeStep::Reinstated), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 5_000, DisputeStep::Withdrawn), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 5_000, DisputeStep::Withdrawn), T), PaymentOutcome::Duplicate);
        assert_eq!(row.paid(), 5_000);
    }

    #[test]
    fn a_payment_charged_back_does_not_start_the_clock() {
        // Pay $5, charge it back, pay $1,000 a month later: paying since the $1,000.
        let mut row = PaymentRow::default();
        row.apply(&record("pi_1", 500, T), T);
        row.apply(&dispute("pi_1", "dp_1", 500, DisputeStep::Withdrawn), T);
        row.apply(&record("pi_2", 100_000, T + 30 * DAY), T + 30 * DAY);
        assert_eq!(row.standing(), Standing::new(100_000, Some(T + 30 * DAY)));
        row.apply(&refund("pi_2", 100_000, T + 31 * DAY), T + 31 * DAY);
        assert_eq!(row.standing(), Standing::new(0, None));
    }

    #[test]
    fn a_reversal_before_its_payment_applies_when_the_payment_lands() {
        let mut row = PaymentRow::default();
        assert_eq!(row.apply(&refund("pi_1", 2_000, T), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 1_000, DisputeStep::Withdrawn), T), PaymentOutcome::Applied);
        assert_eq!(row.apply(&dispute("pi_1", "dp_1", 1_000, DisputeStep::Withdrawn), T), PaymentOutcome::Duplicate);
        assert_eq!(row.standing(), Standing::new(0, None), "no payment yet");
        row.apply(&record("pi_1", 5_000, T), T);
        assert_eq!(row.paid(), 2_000);
        assert!(row.orphans.is_empty());
        // A refund of a payment in another currency: dropped with it.
        row.apply(&refund("pi_9", 1, T), T);
        let eur = PaymentCall::Record {
            tenant: "t".into(),
            payment: "pi_9".into(),
            amount: 9,
            currency: "eur".into(),
            billing: "usd".into(),
            at: T,
        };
        assert_eq!(row.apply(&eur, T), PaymentOutcome::OtherCurrency);
        assert!(row.orphans.is_empty());
    }

    #[test]
    fn reversals_waiting_let_the_oldest_go_and_a_fifth_dispute_changes_nothing() {
        let mut row = PaymentRow::default();
        for i in 0..ORPHANS_KEPT {
            let at = T + i64::try_from(i).unwrap();
            assert_eq!(row.apply(&refund(&format!("pi_{i}"), 1, at), at), PaymentOutcome::Applied);
        }
        assert_eq!(row.changes, u64::try_from(ORPHANS_KEPT).unwrap());
        assert_eq!(row.apply(&refund("pi_new", 1, T + 999), T + 999), PaymentOutcome::Applied);
        assert_eq!(row.orphans.len(), ORPHANS_KEPT);
        assert!(!row.orphans.iter().any(|o| o.id == "pi_0"), "the oldest let go");
        assert_eq!(row.apply(&refund("pi_1", 1, T), T), PaymentOutcome::Duplicate, "one it keeps");
        // Its payment, delivered after all: counted whole (its refund was let go).
        assert_eq!(row.apply(&record("pi_0", 500, T), T), PaymentOutcome::Applied);
        assert_eq!(row.paid(), 500);
        let mut row = PaymentRow::default();
        row.apply(&record("pi_1", 5_000, T), T);
        for i in 0..DISPUTES_KEPT {
            row.apply(&dispute("pi_1", &format!("dp_{i}"), 1, DisputeStep::Withdrawn), T);
        }
        let before = row.clone();
        assert_eq!(row.apply(&dispute("pi_1", "dp_x", 1, DisputeStep::Withdrawn), T), PaymentOutcome::Full);
        assert_eq!(row, before);
    }

    #[test]
    fn the_row_stays_bounded_its_total_whole_and_a_folded_payment_counts_once() {
        let mut row = PaymentRow::default();
        for i in 0..1_000 {
            row.apply(&record(&format!("pi_{i}"), 100, T + i), T + i);
            assert!(row.payments.len() <= PAYMENTS_KEPT);
        }
        assert_eq!(row.standing(), Standing::new(100_000, Some(T)), "folded, not lost");
        // A payment folded, delivered again: not counted twice.
        assert_eq!(row.apply(&record("pi_3", 100, T + 3), T + 1_000), PaymentOutcome::Stale);
        assert_eq!(row.paid(), 100_000);
        let later = T + PAYMENT_KEPT_SECS + 10_000;
        row.apply(&refund("gone", 1, later), later);
        assert!(row.payments.is_empty(), "every payment past its keep time is folded");
        assert_eq!(row.standing(), Standing::new(100_000, Some(T)));
        let json = serde_json::to_string(&row).unwrap();
        let mut full = PaymentRow::default();
        for i in 0..PAYMENTS_KEPT {
            full.apply(&record(&format!("pi_{i:0>27}"), u64::MAX / 4, T + i as i64), T);
        }
        let size = serde_json::to_string(&full).unwrap().len();
        assert!(size < 80_000 && json.len() < 10_000, "a row of {size} bytes");
    }

    #[test]
    fn the_json_a_store_keeps_is_written_only_when_the_row_changed() {
        let (answer, json) = PaymentRow::apply_json(None, &record("pi_1", 500, T), T).unwrap();
        assert_eq!(answer, PaymentAnswer::new(PaymentOutcome::Applied, Standing::new(500, Some(T))).with_changes(1));
        let json = json.unwrap();
        let (answer, again) = PaymentRow::apply_json(Some(&json), &record("pi_1", 500, T), T).unwrap();
        assert_eq!((answer.outcome, answer.changes, again), (PaymentOutcome::Duplicate, 1, None));
        // A row written before its version was kept reads as changed 0 times.
        let old = PaymentRow::apply_json(Some(r#"{"payments":[]}"#), &record("pi_1", 500, T), T).unwrap().0;
        assert_eq!(old.changes, 1);
        let read = PaymentCall::Read { tenant: "t".into() };
        assert_eq!(PaymentRow::apply_json(Some(&json), &read, T).unwrap().0.standing.paid, 500);
        assert!(PaymentRow::apply_json(Some("{"), &read, T).is_err());
    }
}
