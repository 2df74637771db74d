//! A tenant's auto-recharge of a prepaid balance, as every store keeps it beside the balance
//! (as it keeps a spend cap): the tenant's setting, the recharges claimed (numbered, at most
//! one open at a time), the payment failures in a row and the month's spending.
//!
//! It is a mode of [`QuotaStore::reserve`](super::QuotaStore::reserve) on the
//! [`Period::Prepaid`](crate::base::Period::Prepaid) key ([`RechargeMode`]): a call that
//! watches the balance claims recharge number n when the balance it leaves (granted −
//! reserved) is below the tenant's `below`, in a write that checks the balance (so nodes
//! crossing together make one claim). Every store applies a mode by one rule,
//! [`RechargeState::apply`]; the answer says what the call saw ([`RechargeSeen`]).

use serde::{Deserialize, Serialize};

/// Payment failures in a row that turn a tenant's recharge off (`failures_before_off`).
pub const FAILURES_BEFORE_OFF: u32 = 3;

/// How long the node that claims a recharge (or takes it again) has to deliver it (seconds):
/// past it, the next call that watches the balance takes it again, with the same keys. Well
/// under the 24 hours Stripe keeps an idempotency key.
pub const CLAIM_TAKEN_SECS: i64 = 600;

/// How long a recharge whose payment is processing (a bank debit: ACH, SEPA, Bacs) waits for
/// `invoice.paid` or `invoice.payment_failed` before it is taken again (seconds): 21 days, past
/// the 14 business days a SEPA debit may take to fail. Taken again then, its delivery only
/// reads its invoice: it never pays one again.
pub const PROCESSING_SECS: i64 = 21 * 86_400;

/// How long after its claim a recharge found paid by its delivery, with its claim still open,
/// is credited by the worker itself (seconds): an hour. `invoice.paid` comes within seconds of
/// a payment, and Stripe retries a failed delivery within minutes at first; past it, the
/// endpoint is taken to miss it (not subscribed, or down past Stripe's 3 days).
pub const CREDIT_UNANNOUNCED_SECS: i64 = 3600;

/// How long a claim whose delivery lapsed, and that nobody needs any longer (recharge off, or
/// the balance no longer below), stays open and counted in its month (seconds): 4 days, past
/// the 3 days Stripe retries a webhook, so that a payment its node made is told by its
/// `invoice.paid` first. Past it, it is closed unpaid (a late payment of it still grants, and
/// counts it spent again).
pub const UNWANTED_CLAIM_SECS: i64 = 4 * 86_400;

/// After a failed payment, no recharge is claimed for this long (seconds), so that a declined
/// card is not charged again at every request.
pub const RETRY_AFTER_FAILURE_SECS: i64 = 3600;

/// A tenant's recharge of a prepaid meter: when the balance goes below `below` units, buy the
/// packs that bring it to at least `to`, spending at most `monthly_limit` a calendar month
/// (UTC, in the smallest unit of the billing currency). It keeps the pack as it was when set
/// (the plan's credit price, what it grants, and Stripe's `unit_amount` of it), so that every
/// node claims by the same numbers without asking Stripe, and a delivery charges that price
/// only while it still is the plan's at that amount (else recharge is turned off,
/// [`RechargeFailure::PriceChanged`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RechargeSetting {
    /// The balance under which a recharge is claimed.
    pub below: u64,
    /// The balance a recharge brings it to, at least.
    pub to: u64,
    /// The most spent on recharges in a calendar month (UTC), smallest currency unit.
    pub monthly_limit: u64,
    /// What one pack buys and costs.
    pub pack: RechargePack,
    /// The credit price the packs are of (its Stripe id), as it was when set. Empty in a
    /// setting stored before tollgate kept it: its delivery checks the pack alone.
    pub price: String,
    /// Who set it: `"operator"` (`Admin`, the CLI, [`Tollgate::set_recharge`](crate::Tollgate::set_recharge)),
    /// or through the tenant's own route `"key:k_…"` (the key's id) or `"tenant"` (an
    /// [`Identity`](crate::Identity)); empty in a setting stored before tollgate kept it.
    pub set_by: String,
    /// When it was set (Unix seconds; 0 before tollgate kept it).
    pub set_at: i64,
}

impl RechargeSetting {
    /// Below `below`, recharge to `to` in packs of `pack`, at most `monthly_limit` a month.
    #[must_use]
    pub fn new(below: u64, to: u64, monthly_limit: u64, pack: RechargePack) -> Self {
        Self { below, to, monthly_limit, pack, price: String::new(), set_by: String::new(), set_at: 0 }
    }

    /// The same, its packs of the credit price `price` (a Stripe price id).
    #[must_use]
    pub fn with_price(mut self, price: impl Into<String>) -> Self {
        self.price = price.into();
        self
    }

    /// The same, set by `who` (`"operator"`, `"tenant"`) at `at` (Unix seconds).
    #[must_use]
    pub fn set_by(mut self, who: impl Into<String>, at: i64) -> Self {
        self.set_by = who.into();
        self.set_at = at;
        self
    }

    /// Whether it charges as `other` does: the same values, pack and price, whoever set it
    /// and whenever.
    #[must_use]
    pub fn same_values(&self, other: &Self) -> bool {
        (self.below, self.to, self.monthly_limit, self.pack, &self.price)
            == (other.below, other.to, other.monthly_limit, other.pack, &other.price)
    }
}

/// What one pack of the recharge's credit price buys (units of the meter) and costs (smallest
/// currency unit): a recharge buys whole packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RechargePack {
    /// Units of the meter one pack grants.
    pub units: u64,
    /// What one pack costs.
    pub amount: u64,
}

impl RechargePack {
    /// A pack of `units` for `amount`.
    #[must_use]
    pub fn new(units: u64, amount: u64) -> Self {
        Self { units, amount }
    }
}

/// Why a recharge's payment failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RechargeFailure {
    /// The card was declined (`invoice.payment_failed`).
    Declined,
    /// The bank asks for 3-D Secure, which an automatic charge cannot give
    /// (`invoice.payment_action_required`).
    ActionRequired,
    /// The customer has no default payment method.
    NoPaymentMethod,
    /// Stripe refused the charge otherwise.
    Refused,
    /// The plan's recharge price, what its pack grants, its bounds (a downgrade below the
    /// tenant's `to` or limit), or its amount or currency on Stripe (or `unit_amount` gone) is
    /// no longer what the setting counted (a plan change, a reload, a price changed on
    /// Stripe): nothing was charged; turning recharge on again takes the new pack. Not a payment failure: it
    /// turns recharge off at once ([`RechargeMode::Stop`]).
    PriceChanged,
    /// A paid recharge's units could not be granted (the balance's open grants at their
    /// most, or its units past the most a balance holds, or its invoice not a credit
    /// purchase under this configuration): turned off at once, so that the card is not
    /// charged again for units that cannot land. Paid and not credited: a person grants,
    /// frees room (Stripe delivers `invoice.paid` again for 3 days) or refunds.
    GrantRefused,
    /// A recharge's payment was refunded: turned off at once, so that the next request does
    /// not charge the card again (the customer asked for their money back).
    Refunded,
    /// A recharge's payment is disputed: turned off at once, so that the card under dispute
    /// is not charged again.
    Disputed,
}

impl RechargeFailure {
    /// The failures of a payment (counted, [`FAILURES_BEFORE_OFF`] in a row turn recharge
    /// off); the others turn it off at once, with nothing charged.
    pub const PAYMENT: [Self; 4] = [Self::Declined, Self::ActionRequired, Self::NoPaymentMethod, Self::Refused];

    /// Its name in reports, alerts and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Declined => "declined",
            Self::ActionRequired => "action_required",
            Self::NoPaymentMethod => "no_payment_method",
            Self::Refused => "refused",
            Self::PriceChanged => "price_changed",
            Self::GrantRefused => "grant_refused",
            Self::Refunded => "refunded",
            Self::Disputed => "disputed",
        }
    }
}

/// A recharge claimed and not yet paid nor failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RechargeClaim {
    /// Its number for the tenant and meter (from 1): the payment's keys derive from it.
    pub n: u64,
    /// Packs bought.
    pub packs: u64,
    /// What they cost (smallest currency unit).
    pub amount: u64,
    /// When it was claimed (Unix seconds).
    pub claimed_at: i64,
    /// Until when the node that claimed it (or took it last) delivers it, or, once its
    /// payment is processing, until when it waits for its outcome ([`PROCESSING_SECS`]).
    pub taken_until: i64,
    /// Its payment is processing (a bank debit, [`RechargeMode::Processing`]): it waits for
    /// `invoice.paid` or `invoice.payment_failed`, and is never paid again.
    #[serde(default)]
    pub processing: bool,
}

/// A tenant's recharge of a meter as a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RechargeState {
    /// The tenant's setting; `None`: recharge off (never turned on, or turned off by it).
    pub setting: Option<RechargeSetting>,
    /// Why recharge is off, when set: the last payment failure's reason once
    /// [`FAILURES_BEFORE_OFF`] in a row turned it off, or what stopped it at once
    /// ([`RechargeMode::Stop`]: a price changed, a grant refused, a refund, a dispute).
    /// Turning recharge on again clears it.
    #[serde(default)]
    pub off: Option<RechargeFailure>,
    /// Payment failures in a row.
    #[serde(default)]
    pub failures: u32,
    /// When the last failure was counted (Unix seconds; 0 once a recharge is paid since): no
    /// recharge is claimed for [`RETRY_AFTER_FAILURE_SECS`] after it, whatever the setting
    /// became meanwhile.
    #[serde(default)]
    pub failed_at: i64,
    /// The number of the last recharge claimed (0: none yet).
    #[serde(default)]
    pub n: u64,
    /// The recharge open, if any.
    #[serde(default)]
    pub open: Option<RechargeClaim>,
    /// The month (its first second, UTC) that `spent` and `count` count.
    #[serde(default)]
    pub month: i64,
    /// Spent on the month's recharges, open or paid (a failed one gives its amount back).
    #[serde(default)]
    pub spent: u64,
    /// The month's recharges, open or paid.
    #[serde(default)]
    pub count: u32,
    /// The last month whose limit stopped a recharge (its alert goes out once).
    #[serde(default)]
    pub limit_month: i64,
    /// The last recharge closed unpaid (its payment failed, or recharge was stopped with it
    /// open): a late payment of it (`Paid`) counts it spent again.
    #[serde(default)]
    pub unpaid: Option<RechargeClaim>,
    /// Whether `unpaid` closed by a failure counted (a repeated failure of it is answered as
    /// the first was, and not counted again).
    #[serde(default)]
    pub unpaid_failed: bool,
    /// The number of the last recharge closed paid (0: none): its payment told again is
    /// answered [`RechargeSeen::Paid`] again, not `first`.
    #[serde(default)]
    pub paid: u64,
    /// The last recharge whose payment waits for the customer (3-D Secure): its invoice stays
    /// open for them to pay on Stripe's page ([`RechargeMode::ActionRequired`]), until it is
    /// paid or another takes its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<RechargeAction>,
}

/// A recharge whose payment waits for the customer: the bank asked for 3-D Secure, which an
/// automatic charge cannot give, so its invoice stays open for them to pay on Stripe's hosted
/// page (counted as a failure all the same: see [`RechargeMode::ActionRequired`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RechargeAction {
    /// The recharge.
    pub n: u64,
    /// Its invoice's `hosted_invoice_url`, where the customer completes the payment.
    pub url: String,
    /// When it was told (Unix seconds).
    pub at: i64,
    /// What it charges (counted in its month once paid).
    #[serde(default)]
    pub amount: u64,
    /// When it was claimed (its month is the one it counts in).
    #[serde(default)]
    pub claimed_at: i64,
    /// The `set_at` of the setting in force when it was told: storing the setting again ends
    /// the pause ([`pauses`](Self::pauses)).
    #[serde(default)]
    pub setting_at: i64,
}

impl RechargeAction {
    /// The longest page address kept.
    pub const MAX_URL: usize = 2048;

    /// Recharge `n`'s payment waits at `url` since `at`; `None` for an address that is not
    /// `https://` or is longer than [`MAX_URL`](Self::MAX_URL) (never shown to a tenant).
    #[must_use]
    pub fn new(n: u64, url: &str, at: i64) -> Option<Self> {
        let fine =
            url.starts_with("https://") && url.len() <= Self::MAX_URL && url.chars().all(|c| c.is_ascii_graphic());
        fine.then(|| Self { n, url: url.to_owned(), at, amount: 0, claimed_at: 0, setting_at: 0 })
    }

    /// How long at most it pauses the next recharges ([`pauses`](Self::pauses)): three days
    /// (an invoice voided or left unpaid meanwhile ends the pause then).
    pub const PAUSE_SECS: i64 = 3 * 86_400;

    /// Whether it pauses the next recharges at `now` under `setting`: while the setting is the
    /// one in force when it was told (storing it again, turned on or changed, ends the pause),
    /// for at most [`PAUSE_SECS`](Self::PAUSE_SECS), so that the next crossing does not open
    /// another invoice the bank will ask to authenticate too.
    #[must_use]
    pub fn pauses(&self, setting: &RechargeSetting, now: i64) -> bool {
        setting.set_at == self.setting_at && now < self.at.saturating_add(Self::PAUSE_SECS)
    }
}

/// What a [`Reservation`](super::Reservation) of a prepaid key does with the tenant's
/// recharge of the meter: a mode of [`QuotaStore::reserve`](super::QuotaStore::reserve), as
/// the spend cap's [`CapMode`](super::CapMode) is. Every mode but `Ignored` writes, if
/// anything, the record beside the balance only; the reserve itself goes on as it would.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum RechargeMode {
    /// Nothing read or written.
    #[default]
    Ignored,
    /// Stores the tenant's setting (`None`: turns recharge off). Turning recharge on again
    /// (after failures or a stop turned it off, or after it was turned off) clears the
    /// failures in a row and the off state; other values stored while on leave them. The hour
    /// after a failure ([`RETRY_AFTER_FAILURE_SECS`]) still waits: no change has a declined
    /// card charged again sooner. An open recharge stays open (its payment may be under way).
    Set(Option<RechargeSetting>),
    /// After the call, if the balance it leaves (granted − reserved) is below the tenant's
    /// `below`, recharge is on, none is open, no failure was counted in the last
    /// [`RETRY_AFTER_FAILURE_SECS`] and the month's limit allows it: claims the next recharge
    /// of the setting's packs that bring the balance to at least `to`, in a write that checks
    /// that the balance is still below. An open one whose delivery lapsed
    /// ([`CLAIM_TAKEN_SECS`]) is taken again, by the same checks (recharge on, the balance
    /// below `below`; else it stays open and counted in its month, its node may have paid it,
    /// until it is wanted again or its payment is told). `now` by the caller's clock.
    Watch {
        /// The caller's time (Unix seconds).
        now: i64,
    },
    /// Recharge `n` was paid (its grant landed): it is closed (or, closed unpaid before,
    /// counted spent again), and the failures in a row end.
    Paid {
        /// The recharge.
        n: u64,
    },
    /// Recharge `n`'s payment failed: it is closed and gives its amount back to the month,
    /// and one failure is counted (once per recharge); the [`FAILURES_BEFORE_OFF`]th in a row
    /// turns recharge off.
    Failed {
        /// The recharge.
        n: u64,
        /// Why.
        why: RechargeFailure,
        /// The caller's time (Unix seconds).
        now: i64,
    },
    /// Recharge `n`'s payment needs the customer (3-D Secure, which an automatic charge cannot
    /// give): counted as [`Failed`](Self::Failed) with
    /// [`RechargeFailure::ActionRequired`], and its invoice, left open, recorded
    /// ([`RechargeState::action`]) for the customer to pay at `url` (its
    /// `hosted_invoice_url`; not recorded unless [`RechargeAction::new`] takes it). Paid there,
    /// its `invoice.paid` counts it spent again and grants it.
    ActionRequired {
        /// The recharge.
        n: u64,
        /// Its invoice's hosted page.
        url: String,
        /// The caller's time (Unix seconds).
        now: i64,
    },
    /// Recharge `n`'s payment is processing (a bank debit: Stripe answered `pay` with the
    /// invoice still open): it stays open and is not taken again for [`PROCESSING_SECS`], so
    /// that nothing pays it again while `invoice.paid` or `invoice.payment_failed` is days
    /// away. Answered [`RechargeSeen::Open`].
    Processing {
        /// The recharge.
        n: u64,
        /// The caller's time (Unix seconds).
        now: i64,
    },
    /// Turns recharge off at once for `why`, which is no failure of a payment (no failure is
    /// counted, no hour waited): recharge `n`, if open, is closed unpaid (its amount back to
    /// the month), or, for [`RechargeFailure::GrantRefused`] (paid, not credited), closed
    /// with its amount still counted. Answered [`RechargeSeen::Failed`] with `off`, `first` when recharge was on
    /// until this call (its alert goes out once). Turning recharge on again clears it.
    Stop {
        /// The recharge concerned.
        n: u64,
        /// Why.
        why: RechargeFailure,
    },
}

/// What a call with a [`RechargeMode`] saw ([`Grant::recharge`](super::Grant::recharge)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum RechargeSeen {
    /// Nothing to do or tell.
    #[default]
    Nothing,
    /// This call claimed recharge `n` (or took it again once its delivery lapsed): the caller
    /// delivers it. Its answer lost, the claim is taken again once its delivery lapses.
    Claimed {
        /// The recharge.
        n: u64,
        /// Packs to buy.
        packs: u64,
        /// What they cost.
        amount: u64,
    },
    /// Recharge `n` is open (claimed, not yet paid nor failed).
    Open {
        /// The recharge.
        n: u64,
    },
    /// The month's limit stopped a recharge; `first` for the first time in `month` (its
    /// alert goes out once).
    LimitReached {
        /// The month (its first second, UTC).
        month: i64,
        /// The first time this month.
        first: bool,
    },
    /// A failure of recharge `n` is counted (by this call, or by an earlier one of the same
    /// failure: answered alike, but for `first`); `off` when recharge is off since. Also the
    /// answer to [`RechargeMode::Stop`] (no failure counted: `off`, `first` when it was on).
    Failed {
        /// The recharge.
        n: u64,
        /// Recharge turned off by it.
        off: bool,
        /// Counted by this call (a repeat of the same failure: `false`).
        first: bool,
        /// The reason the store keeps: the one that turned recharge off when `off`, else the
        /// failure's as first counted.
        why: RechargeFailure,
    },
    /// Recharge `n` is paid: closed by this call (`first`), or by an earlier one (the last
    /// recharge paid, told again).
    Paid {
        /// The recharge.
        n: u64,
        /// Closed by this call.
        first: bool,
    },
}

/// The first second (UTC) of the calendar month holding `at`.
#[must_use]
pub fn month_of(at: i64) -> i64 {
    use chrono::Datelike as _;
    let Some(t) = chrono::DateTime::from_timestamp(at, 0) else { return 0 };
    chrono::NaiveDate::from_ymd_opt(t.year(), t.month(), 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(0, |d| d.and_utc().timestamp())
}

impl RechargeState {
    /// Whether recharge is on: set, and not turned off by failures.
    #[must_use]
    pub fn on(&self) -> bool {
        self.setting.is_some() && self.off.is_none()
    }

    /// Applies `mode` to the record, the balance after the call being `balance` (granted −
    /// reserved, signed: usage reported past the balance leaves it in debt; `None`: no balance
    /// yet, 0). Every store applies a recharge mode by this rule, and writes the record back
    /// when it changed.
    pub fn apply(&mut self, mode: RechargeMode, balance: Option<i64>) -> RechargeSeen {
        match mode {
            RechargeMode::Ignored => RechargeSeen::Nothing,
            RechargeMode::Set(setting) => {
                // Turned on again (after it was off, or turned off): the failures in a row
                // start again. Other values while on keep them, so that three failures still
                // turn a declining card off whatever a script changes meanwhile.
                let again = self.off.is_some() || self.setting.is_none();
                if again && setting.is_some() {
                    self.off = None;
                    self.failures = 0;
                }
                self.setting = setting;
                RechargeSeen::Nothing
            }
            RechargeMode::Watch { now } => self.watch(now, balance.unwrap_or(0)),
            RechargeMode::Paid { n } => {
                let acted = self.action.take_if(|a| a.n == n);
                if self.open.is_some_and(|c| c.n == n) {
                    self.open = None;
                    (self.failures, self.failed_at) = (0, 0);
                } else if let Some(late) = self.unpaid.filter(|c| c.n == n) {
                    // Paid after all (a payment retried, or paid by hand): spent again.
                    if self.month == month_of(late.claimed_at) {
                        self.spent = self.spent.saturating_add(late.amount);
                        self.count = self.count.saturating_add(1);
                    }
                    (self.unpaid, self.unpaid_failed, self.failures, self.failed_at) = (None, false, 0, 0);
                } else if self.paid == n && n > 0 {
                    return RechargeSeen::Paid { n, first: false };
                } else if let Some(acted) = acted {
                    // Paid on its page after a later recharge closed unpaid: spent again.
                    if self.month == month_of(acted.claimed_at) {
                        self.spent = self.spent.saturating_add(acted.amount);
                        self.count = self.count.saturating_add(1);
                    }
                    (self.failures, self.failed_at) = (0, 0);
                } else {
                    return RechargeSeen::Nothing;
                }
                self.paid = self.paid.max(n);
                RechargeSeen::Paid { n, first: true }
            }
            RechargeMode::Processing { n, now } => match &mut self.open {
                Some(claim) if claim.n == n => {
                    claim.processing = true;
                    claim.taken_until = claim.taken_until.max(now.saturating_add(PROCESSING_SECS));
                    RechargeSeen::Open { n }
                }
                _ => RechargeSeen::Nothing,
            },
            RechargeMode::Stop { n, why } => {
                if let Some(claim) = self.open.filter(|c| c.n == n) {
                    if why == RechargeFailure::GrantRefused {
                        // Paid, not credited: the money was taken, so it stays counted in the
                        // month; its grant landing later is told as paid again, not counted.
                        self.open = None;
                        self.paid = self.paid.max(n);
                    } else {
                        self.close_unpaid(claim);
                    }
                }
                let first = self.on();
                if first {
                    self.off = Some(why);
                }
                RechargeSeen::Failed { n, off: true, first, why: self.off.unwrap_or(why) }
            }
            RechargeMode::ActionRequired { n, url, now } => {
                let seen = self.apply(RechargeMode::Failed { n, why: RechargeFailure::ActionRequired, now }, balance);
                // Counted by this call only: a failure counted before (a decline whose invoice
                // was voided) shows no page.
                if matches!(seen, RechargeSeen::Failed { first: true, .. }) {
                    if let (Some(mut action), Some(claim)) = (RechargeAction::new(n, &url, now), self.unpaid) {
                        (action.amount, action.claimed_at) = (claim.amount, claim.claimed_at);
                        action.setting_at = self.setting.as_ref().map_or(0, |s| s.set_at);
                        self.action = Some(action);
                    }
                }
                seen
            }
            RechargeMode::Failed { n, why, now } => {
                if self.unpaid_failed && self.unpaid.is_some_and(|c| c.n == n) {
                    let why = self.off.unwrap_or(why);
                    return RechargeSeen::Failed { n, off: self.turned_off(), first: false, why };
                }
                let claim = match (self.open, self.unpaid) {
                    (Some(c), _) if c.n == n => {
                        self.close_unpaid(c);
                        c
                    }
                    // Dropped once its delivery lapsed, then its payment failed after all.
                    (_, Some(c)) if c.n == n => c,
                    _ => return RechargeSeen::Nothing,
                };
                self.unpaid = Some(claim);
                self.unpaid_failed = true;
                self.failures = self.failures.saturating_add(1);
                self.failed_at = now;
                if self.failures >= FAILURES_BEFORE_OFF && self.off.is_none() && self.setting.is_some() {
                    self.off = Some(why);
                }
                RechargeSeen::Failed { n, off: self.turned_off(), first: true, why: self.off.unwrap_or(why) }
            }
        }
    }

    /// Whether the last failure counted is the one that turned recharge off (the
    /// [`FAILURES_BEFORE_OFF`]th in a row: after it, no recharge is claimed).
    fn turned_off(&self) -> bool {
        self.off.is_some() && self.failures == FAILURES_BEFORE_OFF
    }

    /// Closes the open claim `claim` unpaid: its amount leaves the month's spending.
    fn close_unpaid(&mut self, claim: RechargeClaim) {
        self.open = None;
        if self.month == month_of(claim.claimed_at) {
            self.spent = self.spent.saturating_sub(claim.amount);
            self.count = self.count.saturating_sub(1);
        }
        (self.unpaid, self.unpaid_failed) = (Some(claim), false);
    }

    fn watch(&mut self, now: i64, balance: i64) -> RechargeSeen {
        let below = |s: &RechargeSetting| i128::from(balance) < i128::from(s.below);
        let wanted = self.setting.clone().filter(|s| self.off.is_none() && below(s) && s.pack.units > 0);
        if let Some(mut claim) = self.open {
            if claim.taken_until > now {
                return RechargeSeen::Open { n: claim.n };
            }
            if wanted.is_none() {
                // Its node died or lost it, and recharge is off or the balance no longer
                // below: not taken again, so never charged by another node while nobody needs
                // it. Not dropped at once either: its node may have paid it, its
                // `invoice.paid` late (Stripe retries for 3 days), so it stays open and counted
                // in its month for `UNWANTED_CLAIM_SECS`. Wanted again meanwhile, it is taken
                // again under its keys (its delivery finds it paid, or pays it); its payment
                // told closes it. (Dropped at once, its amount went back to the month: a
                // second recharge was charged beside the paid one, past the month's limit.)
                if now >= claim.claimed_at.saturating_add(UNWANTED_CLAIM_SECS) {
                    self.close_unpaid(claim);
                }
                return RechargeSeen::Nothing;
            }
            // Its node died or lost it: taken again, with the same number (and keys).
            claim.taken_until = now.saturating_add(CLAIM_TAKEN_SECS);
            self.open = Some(claim);
            return RechargeSeen::Claimed { n: claim.n, packs: claim.packs, amount: claim.amount };
        }
        let Some(setting) = wanted else { return RechargeSeen::Nothing };
        // A recharge whose payment waits for the customer (3-D Secure) pauses the next ones.
        if self.action.as_ref().is_some_and(|a| a.pauses(&setting, now)) {
            return RechargeSeen::Nothing;
        }
        let pack = setting.pack;
        if self.failed_at > 0 && now < self.failed_at.saturating_add(RETRY_AFTER_FAILURE_SECS) {
            return RechargeSeen::Nothing;
        }
        // From the balance as it is, debt included: the packs that reach `to`, once.
        let room = (i128::from(setting.to) - i128::from(balance)).max(0);
        let packs = u64::try_from(room).unwrap_or(u64::MAX).div_ceil(pack.units).max(1);
        let amount = packs.saturating_mul(pack.amount);
        let month = month_of(now);
        // A call of an earlier month (a node's clock behind) never takes the month back.
        if month > self.month {
            (self.month, self.spent, self.count) = (month, 0, 0);
        }
        if self.spent.saturating_add(amount) > setting.monthly_limit {
            let first = self.limit_month != month;
            self.limit_month = month;
            return RechargeSeen::LimitReached { month, first };
        }
        self.n = self.n.saturating_add(1);
        self.spent = self.spent.saturating_add(amount);
        self.count = self.count.saturating_add(1);
        self.open = Some(RechargeClaim {
            n: self.n,
            packs,
            amount,
            claimed_at: now,
            taken_until: now.saturating_add(CLAIM_TAKEN_SECS),
            processing: false,
        });
        RechargeSeen::Claimed { n: self.n, packs, amount }
    }

    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres", feature = "dynamodb")), allow(dead_code))]
    /// The record as stores keep it (JSON text).
    #[must_use]
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres", feature = "dynamodb")), allow(dead_code))]
    /// A record kept as JSON text. An unreadable one is an error, never a fresh record (its
    /// recharge number must never go back: the payments' keys derive from it).
    pub(crate) fn of_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("a recharge record that does not read ({e}): {text}"))
    }

    #[cfg_attr(not(any(feature = "postgres", feature = "dynamodb")), allow(dead_code))]
    /// [`of_json`](Self::of_json), its error a store's.
    pub(crate) fn read(text: &str) -> Result<Self, super::StoreError> {
        Self::of_json(text).map_err(|e| super::StoreError::Backend(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_773_446_400; // 2026-03-14
    const PACK: RechargePack = RechargePack { units: 1000, amount: 500 };

    fn on() -> RechargeState {
        let mut s = RechargeState::default();
        s.apply(RechargeMode::Set(Some(RechargeSetting::new(2000, 5000, 2500, PACK))), None);
        s
    }

    #[test]
    fn a_crossing_claims_the_packs_that_reach_to_once() {
        let mut s = on();
        let watch = RechargeMode::Watch { now: NOW };
        assert_eq!(s.apply(watch.clone(), Some(2000)), RechargeSeen::Nothing, "not below");
        assert_eq!(s.apply(watch.clone(), Some(1999)), RechargeSeen::Claimed { n: 1, packs: 4, amount: 2000 });
        assert_eq!(s.apply(watch.clone(), Some(10)), RechargeSeen::Open { n: 1 }, "one open at a time");
        let later = RechargeMode::Watch { now: NOW + CLAIM_TAKEN_SECS };
        assert_eq!(s.apply(later, Some(10)), RechargeSeen::Claimed { n: 1, packs: 4, amount: 2000 }, "taken again");
        s.apply(RechargeMode::Paid { n: 1 }, None);
        assert_eq!(s.open, None);
        // 20.00 of the month's 25.00 are spent: the next one waits for the next month.
        assert_eq!(
            s.apply(watch.clone(), Some(1999)),
            RechargeSeen::LimitReached { month: month_of(NOW), first: true }
        );
        assert_eq!(
            s.apply(watch.clone(), Some(1999)),
            RechargeSeen::LimitReached { month: month_of(NOW), first: false }
        );
        let april = RechargeMode::Watch { now: NOW + 20 * 86_400 };
        assert_eq!(s.apply(april, Some(0)), RechargeSeen::Claimed { n: 2, packs: 5, amount: 2500 });
    }

    #[test]
    fn three_failures_in_a_row_turn_recharge_off_until_it_is_set_again() {
        let mut s = on();
        s.setting = Some(RechargeSetting::new(2000, 5000, 100_000, PACK));
        let mut now = NOW;
        for k in 1..=3u64 {
            assert_eq!(
                s.apply(RechargeMode::Watch { now }, Some(0)),
                RechargeSeen::Claimed { n: k, packs: 5, amount: 2500 }
            );
            let failed = RechargeMode::Failed { n: k, why: RechargeFailure::Declined, now };
            let why = RechargeFailure::Declined;
            assert_eq!(s.apply(failed.clone(), None), RechargeSeen::Failed { n: k, off: k == 3, first: true, why });
            assert_eq!(
                s.apply(failed.clone(), None),
                RechargeSeen::Failed { n: k, off: k == 3, first: false, why },
                "alike"
            );
            assert_eq!(s.failures, u32::try_from(k).unwrap(), "counted once");
            assert_eq!(s.apply(RechargeMode::Watch { now: now + 1 }, Some(0)), RechargeSeen::Nothing, "waits");
            now += RETRY_AFTER_FAILURE_SECS;
        }
        assert_eq!((s.off, s.spent, s.count), (Some(RechargeFailure::Declined), 0, 0), "failed ones are not spent");
        assert_eq!(s.apply(RechargeMode::Watch { now }, Some(0)), RechargeSeen::Nothing, "off");
        s.apply(RechargeMode::Set(s.setting.clone()), None);
        assert!(s.on());
        assert_eq!(
            s.apply(RechargeMode::Watch { now }, Some(0)),
            RechargeSeen::Claimed { n: 4, packs: 5, amount: 2500 }
        );
        assert_eq!(RechargeState::of_json(&s.to_json()), Ok(s));
        assert!(RechargeState::of_json("{\"n\": \"x\"}").is_err());
    }

    #[test]
    fn a_lapsed_claim_is_taken_again_only_while_still_wanted() {
        let lapse = NOW + CLAIM_TAKEN_SECS;
        // Turned off meanwhile: not taken again, and still open and counted in its month (its
        // node may have paid it).
        let mut s = on();
        assert!(matches!(s.apply(RechargeMode::Watch { now: NOW }, Some(0)), RechargeSeen::Claimed { n: 1, .. }));
        s.apply(RechargeMode::Set(None), None);
        assert_eq!(s.apply(RechargeMode::Watch { now: lapse }, Some(0)), RechargeSeen::Nothing);
        assert_eq!((s.open.map(|c| c.n), s.unpaid, s.spent), (Some(1), None, 2500));
        // Past Stripe's retries with nothing told, it closes unpaid: its amount back to the month.
        let mut dropped = s.clone();
        let horizon = RechargeMode::Watch { now: NOW + UNWANTED_CLAIM_SECS };
        assert_eq!(dropped.apply(horizon, Some(0)), RechargeSeen::Nothing);
        assert_eq!((dropped.open, dropped.unpaid.map(|c| c.n), dropped.spent), (None, Some(1), 0));
        // Its payment failed after all: counted once, answered alike.
        let failed = RechargeMode::Failed { n: 1, why: RechargeFailure::Declined, now: lapse };
        let why = RechargeFailure::Declined;
        assert_eq!(s.apply(failed.clone(), None), RechargeSeen::Failed { n: 1, off: false, first: true, why });
        assert_eq!(s.apply(failed.clone(), None), RechargeSeen::Failed { n: 1, off: false, first: false, why });
        assert_eq!(s.failures, 1);
        // Then paid after all (the customer paid the open invoice): closed paid once, told
        // again as paid (not first), and never counted twice.
        assert_eq!(s.apply(RechargeMode::Paid { n: 1 }, None), RechargeSeen::Paid { n: 1, first: true });
        assert_eq!((s.unpaid, s.failures, s.paid), (None, 0, 1));
        assert_eq!(s.apply(RechargeMode::Paid { n: 1 }, None), RechargeSeen::Paid { n: 1, first: false });
        assert_eq!(s.apply(RechargeMode::Paid { n: 2 }, None), RechargeSeen::Nothing, "never claimed");
        // Still wanted: taken again with its number.
        let mut s = on();
        s.apply(RechargeMode::Watch { now: NOW }, Some(0));
        assert_eq!(
            s.apply(RechargeMode::Watch { now: lapse }, Some(10)),
            RechargeSeen::Claimed { n: 1, packs: 5, amount: 2500 }
        );
    }

    #[test]
    fn the_hour_after_a_failure_survives_a_change_of_values() {
        let mut s = on();
        assert!(matches!(s.apply(RechargeMode::Watch { now: NOW }, Some(0)), RechargeSeen::Claimed { n: 1, .. }));
        s.apply(RechargeMode::Failed { n: 1, why: RechargeFailure::Declined, now: NOW }, None);
        let other = RechargeSetting::new(1500, 5000, 2500, PACK).set_by("tenant", NOW + 1);
        s.apply(RechargeMode::Set(Some(other)), None);
        assert_eq!(s.failures, 1, "other values while on: the failures in a row go on");
        let soon = RechargeMode::Watch { now: NOW + 2 };
        assert_eq!(s.apply(soon, Some(0)), RechargeSeen::Nothing, "but the hour still waits");
        let later = RechargeMode::Watch { now: NOW + RETRY_AFTER_FAILURE_SECS };
        assert!(matches!(s.apply(later, Some(0)), RechargeSeen::Claimed { n: 2, .. }));
        // Paid: no wait is left of the failure before.
        s.apply(RechargeMode::Paid { n: 2 }, None);
        assert_eq!(s.failed_at, 0);
        // A script changing `below` between declines: the third still turns it off.
        let mut c = on();
        c.setting = Some(RechargeSetting::new(2000, 5000, 100_000, PACK));
        let mut now = NOW;
        for k in 1..=3u64 {
            assert!(matches!(c.apply(RechargeMode::Watch { now }, Some(0)), RechargeSeen::Claimed { .. }), "{k}");
            c.apply(RechargeMode::Failed { n: k, why: RechargeFailure::Declined, now }, None);
            if k < 3 {
                let below = 2000 - k;
                c.apply(RechargeMode::Set(Some(RechargeSetting::new(below, 5000, 100_000, PACK))), None);
            }
            now += RETRY_AFTER_FAILURE_SECS;
        }
        assert_eq!((c.off, c.failures), (Some(RechargeFailure::Declined), 3));
        // Who set it and when is not a change of values.
        let mut t = on();
        t.failures = 2;
        let same = t.setting.clone().unwrap().set_by("operator", NOW + 9);
        t.apply(RechargeMode::Set(Some(same)), None);
        assert_eq!(t.failures, 2);
    }

    #[test]
    fn a_balance_in_debt_claims_the_packs_that_reach_to_from_the_debt() {
        let mut s = on();
        let watch = RechargeMode::Watch { now: NOW };
        // Below 2,000, to 5,000 in packs of 1,000: from -3,000, 8 packs (from 0: 5).
        assert_eq!(s.apply(watch, Some(-3000)), RechargeSeen::LimitReached { month: month_of(NOW), first: true });
        s.setting = Some(RechargeSetting::new(2000, 5000, 100_000, PACK));
        let watch = RechargeMode::Watch { now: NOW };
        assert_eq!(s.apply(watch, Some(-3000)), RechargeSeen::Claimed { n: 1, packs: 8, amount: 4000 });
    }

    #[test]
    fn a_processing_payment_waits_days_not_minutes() {
        let mut s = on();
        assert!(matches!(s.apply(RechargeMode::Watch { now: NOW }, Some(0)), RechargeSeen::Claimed { n: 1, .. }));
        assert_eq!(s.apply(RechargeMode::Processing { n: 2, now: NOW }, None), RechargeSeen::Nothing, "not open");
        assert_eq!(s.apply(RechargeMode::Processing { n: 1, now: NOW }, None), RechargeSeen::Open { n: 1 });
        let open = s.open.unwrap();
        assert_eq!((open.processing, open.taken_until), (true, NOW + PROCESSING_SECS));
        let lapse = RechargeMode::Watch { now: NOW + CLAIM_TAKEN_SECS + 3600 };
        assert_eq!(s.apply(lapse, Some(0)), RechargeSeen::Open { n: 1 }, "not taken again within days");
        let bound = RechargeMode::Watch { now: NOW + PROCESSING_SECS };
        assert!(matches!(s.apply(bound, Some(0)), RechargeSeen::Claimed { n: 1, .. }), "taken again at the bound");
        assert!(s.open.unwrap().processing, "still marked: its delivery only reads the invoice");
        assert_eq!(s.apply(RechargeMode::Paid { n: 1 }, None), RechargeSeen::Paid { n: 1, first: true });
    }

    /// A recharge whose payment waits for 3-D Secure keeps its page once (the failure counted
    /// once), pauses the next recharges until it is paid or the setting is stored again, and,
    /// paid on its page after a later recharge closed unpaid, counts in its month.
    #[test]
    fn a_recharge_waiting_for_3d_secure_pauses_the_next_and_counts_once_paid() {
        let url = "https://invoice.stripe.com/i/acct_1/test_x";
        let mut s = on();
        assert!(matches!(s.apply(RechargeMode::Watch { now: NOW }, Some(0)), RechargeSeen::Claimed { n: 1, .. }));
        let spent = s.spent;
        let action = RechargeMode::ActionRequired { n: 1, url: url.into(), now: NOW };
        assert!(matches!(s.apply(action.clone(), None), RechargeSeen::Failed { first: true, .. }));
        let kept = s.action.clone().unwrap();
        assert_eq!((kept.n, kept.url.as_str(), kept.amount, s.spent, s.failures), (1, url, spent, 0, 1));
        assert!(matches!(s.apply(action, None), RechargeSeen::Failed { first: false, .. }), "once");
        let later = RechargeMode::Watch { now: NOW + 2 * RETRY_AFTER_FAILURE_SECS };
        assert_eq!(s.apply(later.clone(), Some(0)), RechargeSeen::Nothing, "paused while it waits");
        // A repeat of a failure counted before (a decline whose invoice was voided) shows no page.
        let mut declined = on();
        declined.apply(RechargeMode::Watch { now: NOW }, Some(0));
        declined.apply(RechargeMode::Failed { n: 1, why: RechargeFailure::Declined, now: NOW }, None);
        declined.apply(RechargeMode::ActionRequired { n: 1, url: url.into(), now: NOW }, None);
        assert_eq!(declined.action, None);
        // Stored again, the next is claimed, and declined; then the first is paid on its page.
        let mut setting = s.setting.clone().unwrap();
        setting.set_at = NOW - 60; // stored again (on a node whose clock is behind)
        s.apply(RechargeMode::Set(Some(setting)), None);
        assert!(matches!(s.apply(later, Some(0)), RechargeSeen::Claimed { n: 2, .. }));
        let at = NOW + 2 * RETRY_AFTER_FAILURE_SECS;
        s.apply(RechargeMode::Failed { n: 2, why: RechargeFailure::Declined, now: at }, None);
        assert_eq!(s.spent, 0);
        assert_eq!(s.apply(RechargeMode::Paid { n: 1 }, None), RechargeSeen::Paid { n: 1, first: true });
        assert_eq!((s.spent, s.failures, s.action.is_none()), (spent, 0, true), "counted once paid");
        assert_eq!(s.apply(RechargeMode::Paid { n: 1 }, None), RechargeSeen::Paid { n: 1, first: false });
        assert_eq!(s.spent, spent, "once");
    }

    #[test]
    fn months_start_at_midnight_utc_on_the_first() {
        assert_eq!(month_of(NOW), 1_772_323_200); // 2026-03-01
        assert_eq!(month_of(1_772_323_200), 1_772_323_200);
        assert_eq!(month_of(1_772_323_199), 1_769_904_000); // 2026-02-01
    }
}
