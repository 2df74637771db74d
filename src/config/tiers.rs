//! `[tiers.<name>]`: ladders of plans a tenant climbs as it pays, the way the large AI APIs
//! sell their rate limits (a tier's plan unlocked by the money paid since the first payment and
//! the days since it).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{validator::Validator, BillingSettings, ConfigError, ConfigErrorKind as Kind, PlanSpec};
use crate::base::PlanId;
use crate::base::Standing;

/// `[tiers.NAME]`: `order`, `downgrade`, and a threshold keyed by each plan of `order` past the
/// first (any other key is one of them: a key no plan of `order` names is refused when checked).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct RawTier {
    pub(crate) order: Vec<String>,
    #[serde(default)]
    pub(crate) downgrade: Option<bool>,
    #[serde(flatten)]
    pub(crate) steps: BTreeMap<String, RawStep>,
}

/// `tierN = { paid = "50.00", age = "7d" }`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    pub(crate) paid: Option<String>,
    pub(crate) age: Option<String>,
}

/// What unlocks a tier: the money paid for the tenant since its first payment (net of refunds
/// and disputes), in the billing currency's smallest unit, and the time since that payment.
/// Both must be reached. The first tier of a ladder has none (zero and zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TierStep {
    pub(crate) paid: u64,
    pub(crate) age: Duration,
}

impl TierStep {
    /// The money to have paid, in the billing currency's smallest unit (cents for `usd`).
    #[must_use]
    pub fn paid(&self) -> u64 {
        self.paid
    }

    /// The time since the first payment.
    #[must_use]
    pub fn age(&self) -> Duration {
        self.age
    }

    /// Whether `paid` (smallest units) paid over `age` reaches this step.
    #[must_use]
    pub fn reached(&self, paid: u64, age: Duration) -> bool {
        paid >= self.paid && age >= self.age
    }
}

/// A ladder of plans declared with `[tiers.NAME]`, lowest first: a tenant on one of its plans
/// moves up to the highest plan whose [`TierStep`] its payments reach. With `downgrade`, it
/// also moves down when refunds or disputes take it below its tier's step (never, without:
/// the tier once reached is kept, as OpenAI and xAI do).
#[derive(Debug, Clone)]
pub struct TierSpec {
    pub(crate) name: Box<str>,
    pub(crate) plans: Vec<PlanId>,
    /// `steps[i]` unlocks `plans[i]`; `steps[0]` is zero.
    pub(crate) steps: Vec<TierStep>,
    pub(crate) downgrade: bool,
}

impl TierSpec {
    /// The ladder's name (`[tiers.NAME]`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its plans, lowest first.
    #[must_use]
    pub fn plans(&self) -> &[PlanId] {
        &self.plans
    }

    /// What unlocks `plan`, if it is one of the ladder's (zero for the first).
    #[must_use]
    pub fn step(&self, plan: &PlanId) -> Option<TierStep> {
        self.position(plan).map(|i| self.steps[i])
    }

    /// Whether a tenant moves down when refunds or disputes take it below its tier's step.
    #[must_use]
    pub fn downgrade(&self) -> bool {
        self.downgrade
    }

    /// Where `plan` stands on the ladder (0: the first), whatever its version.
    #[must_use]
    pub fn position(&self, plan: &PlanId) -> Option<usize> {
        self.plans.iter().position(|p| p.same_plan(plan))
    }

    /// The plan a tenant on `current` moves to, standing as `standing` says at `now` (Unix
    /// seconds): the highest plan whose step it reaches, never below `current`; with
    /// `reversal` (a refund or a dispute took money back) and a ladder that moves down, the
    /// highest it reaches (the first at least). `None` when it stays, or `current` is not on
    /// the ladder.
    #[must_use]
    pub fn move_of(&self, current: &PlanId, standing: Standing, now: i64, reversal: bool) -> Option<&PlanId> {
        let at = self.position(current)?;
        let (paid, age) = Self::reach(standing, now);
        let reached = self.steps.iter().rposition(|s| s.reached(paid, age)).unwrap_or(0);
        let to = if reached > at || (self.downgrade && reversal) { reached } else { at };
        (to != at).then(|| &self.plans[to])
    }

    /// The plan above `current` and what is still missing to reach it: the money still to pay
    /// (smallest units) and the time still to wait, counted from the first payment (`None`
    /// before any: the wait starts with it). `None` at the top, or off the ladder.
    #[must_use]
    pub fn next(&self, current: &PlanId, standing: Standing, now: i64) -> Option<(&PlanId, u64, Option<Duration>)> {
        let at = self.position(current)?;
        let plan = self.plans.get(at + 1)?;
        let step = self.steps[at + 1];
        let (paid, age) = Self::reach(standing, now);
        let wait = standing.first_at.map(|_| step.age.saturating_sub(age));
        Some((plan, step.paid.saturating_sub(paid), wait))
    }

    /// When a tenant standing so will have waited long enough for the next step above
    /// `current` it has paid for (Unix seconds): the daily check moves it then. `None` when no
    /// wait is left to end (nothing paid, the money not reached, the top).
    #[must_use]
    pub fn due_at(&self, current: &PlanId, standing: Standing) -> Option<i64> {
        let at = self.position(current)?;
        let first = standing.first_at?;
        self.steps[at + 1..]
            .iter()
            .filter(|s| standing.paid >= s.paid)
            .map(|s| first.saturating_add(i64::try_from(s.age.as_secs()).unwrap_or(i64::MAX)))
            .min()
    }

    /// (paid, time since the first payment) of `standing` at `now`.
    fn reach(standing: Standing, now: i64) -> (u64, Duration) {
        let age = standing
            .first_at
            .map_or(Duration::ZERO, |f| Duration::from_secs(u64::try_from(now.saturating_sub(f)).unwrap_or(0)));
        (standing.paid, age)
    }
}

impl Validator<'_, '_> {
    /// `[tiers]`: each ladder's plans (declared, each on one ladder at most), its thresholds
    /// (one per plan past the first, in the billing currency, never lower than the one below)
    /// and `downgrade`.
    pub(super) fn tiers(
        &self,
        raw: &BTreeMap<String, RawTier>,
        plans: &BTreeMap<PlanId, PlanSpec>,
        billing: &BillingSettings,
    ) -> Result<Vec<TierSpec>, ConfigError> {
        let mut ladders: Vec<TierSpec> = Vec::new();
        for (name, t) in raw {
            let base = format!("tiers.{name}");
            super::validator::check_name(self, &base, name)?;
            if billing.currency.is_none() {
                // Ages alone too: the days are counted from a first payment in it.
                return Err(self.invalid(
                    &base,
                    "a ladder counts money paid, and the days since the first payment, in the billing currency: \
                     [billing] currency = \"usd\"",
                ));
            }
            if t.order.len() < 2 {
                return Err(self.invalid(
                    &format!("{base}.order"),
                    "a ladder lists at least two plans, lowest first: with one there is nowhere to move",
                ));
            }
            let mut order: Vec<PlanId> = Vec::with_capacity(t.order.len());
            for (i, p) in t.order.iter().enumerate() {
                let path = format!("{base}.order[{i}]");
                let id = self.plan_ref(plans, &path, p)?;
                if order.contains(&id) {
                    return Err(self.loc.error(Kind::Conflict, &path, format!("plan `{id}` is listed twice")));
                }
                if let Some(other) = ladders.iter().find(|l| l.plans.contains(&id)) {
                    return Err(self.loc.error(
                        Kind::Conflict,
                        &path,
                        format!(
                            "plan `{id}` is on the ladder `{}` already: a plan is on one ladder at most \
                             (a tenant on it would not know which to climb)",
                            other.name
                        ),
                    ));
                }
                order.push(id);
            }
            if let Some(p) = order.iter().find(|p| ["order", "downgrade"].contains(&p.name())) {
                return Err(self.invalid(
                    &format!("{base}.order"),
                    format!(
                        "a ladder's plan cannot be named `{p}`: its threshold's key would be the ladder's own `{p}`"
                    ),
                ));
            }
            if let Some(key) = t.steps.keys().find(|k| !order.iter().any(|p| p.name() == k.as_str())) {
                return Err(self.loc.error(
                    Kind::UnknownKey,
                    &format!("{base}.{key}"),
                    format!(
                        "`{key}` is neither `order`, `downgrade` nor a plan of this ladder's order ({}): \
                         each threshold is keyed by the plan it unlocks",
                        t.order.join(", ")
                    ),
                ));
            }
            if t.steps.contains_key(order[0].name()) {
                return Err(self.invalid(
                    &format!("{base}.{}", order[0].name()),
                    format!(
                        "`{}` is the ladder's first plan, where tenants start: it has no threshold",
                        order[0].name()
                    ),
                ));
            }
            let mut steps = vec![TierStep::default()];
            for (i, id) in order.iter().enumerate().skip(1) {
                let plan = id.name();
                let key = format!("{base}.{plan}");
                let Some(raw) = t.steps.get(plan) else {
                    return Err(self.invalid(
                        &format!("{base}.order[{i}]"),
                        format!(
                            "plan `{plan}` has no threshold: write `{plan} = {{ paid = \"50.00\", age = \"7d\" }}` \
                             under [{base}]"
                        ),
                    ));
                };
                let step = self.tier_step(&key, raw, billing)?;
                let below = steps[i - 1];
                let (lower, what) = if step.paid < below.paid {
                    (true, "paid")
                } else if step.age < below.age {
                    (true, "age")
                } else {
                    (false, "")
                };
                if lower {
                    return Err(self.invalid(
                        &format!("{key}.{what}"),
                        format!(
                            "less than the threshold of `{}` below it: the plans of `order` are lowest first, \
                             and a higher tier never asks for less",
                            order[i - 1].name()
                        ),
                    ));
                }
                if step == below {
                    return Err(self.invalid(
                        &key,
                        format!(
                            "the same threshold as `{}` below it: that plan would never be held",
                            order[i - 1].name()
                        ),
                    ));
                }
                steps.push(step);
            }
            ladders.push(TierSpec {
                name: name.as_str().into(),
                plans: order,
                steps,
                downgrade: t.downgrade.unwrap_or(false),
            });
        }
        Ok(ladders)
    }

    /// A ladder's plans are moved to by the ladder alone: not by Stripe's events, subscription
    /// prices or statuses (each payment would move the tenant back and forth), not the plan of
    /// an organization (whose payments are its tenants'), not a tenant declared in the file
    /// (the file sets its plan at every load). Each use is refused, named.
    pub(super) fn ladders_apart(
        &self,
        tiers: &[TierSpec],
        stripe: Option<&super::StripeSettings>,
        orgs: &BTreeMap<crate::base::OrgId, super::OrgSpec>,
        tenants: &[super::TenantSpec],
    ) -> Result<(), ConfigError> {
        let ladder_of = |plan: &PlanId| tiers.iter().find(|t| t.plans.iter().any(|p| p.same_plan(plan)));
        let refuse = |path: String, plan: &PlanId, ladder: &TierSpec, why: &str| {
            self.loc.error(
                Kind::Conflict,
                &path,
                format!("plan `{plan}` is on the ladder `{}` ([tiers.{}]): {why}", ladder.name, ladder.name),
            )
        };
        if let Some(s) = stripe {
            let moves = "the ladder moves its tenants as they pay; a Stripe event moving them too would move them back and forth";
            for (event, plan) in &s.events {
                if let Some(l) = ladder_of(plan) {
                    return Err(refuse(format!("stripe.events.\"{event}\""), plan, l, moves));
                }
            }
            for (price, plan) in &s.prices {
                if let Some(l) = ladder_of(plan) {
                    return Err(refuse(format!("stripe.prices.\"{price}\""), plan, l, moves));
                }
            }
            for (status, outcome) in &s.subscription_status {
                if let super::StatusOutcome::Plan(plan) = outcome {
                    if let Some(l) = ladder_of(plan) {
                        return Err(refuse(format!("stripe.subscription_status.{status}"), plan, l, moves));
                    }
                }
            }
        }
        for (id, org) in orgs {
            if let Some(l) = ladder_of(&org.plan) {
                let why = "an organization's plan is not climbed (what is paid is its tenants')";
                return Err(refuse(format!("orgs.{id}.plan"), &org.plan, l, why));
            }
        }
        for t in tenants {
            if let Some(l) = ladder_of(&t.plan) {
                let why = "a tenant declared in the file keeps the file's plan at every load; add it to the directory \
                           (tollgate tenants add) for it to climb";
                return Err(refuse(format!("tenants.{}.plan", t.id), &t.plan, l, why));
            }
        }
        Ok(())
    }

    /// One threshold at `key`: `paid` (money in the billing currency, optionally followed by
    /// that currency's code) and `age` (a duration), at least one of them.
    fn tier_step(&self, key: &str, raw: &RawStep, billing: &BillingSettings) -> Result<TierStep, ConfigError> {
        if raw.paid.is_none() && raw.age.is_none() {
            return Err(self.invalid(key, "a threshold needs `paid`, `age` or both"));
        }
        let paid = match raw.paid.as_deref() {
            None => 0,
            Some(text) => {
                let path = format!("{key}.paid");
                let Some(currency) = billing.currency.as_deref() else {
                    return Err(self.invalid(
                        &path,
                        "a threshold in money needs the currency it is paid in: [billing] currency = \"usd\"",
                    ));
                };
                let mut words = text.split_whitespace();
                let amount = words.next().unwrap_or("");
                if let Some(code) = words.next() {
                    if !code.eq_ignore_ascii_case(currency) || words.next().is_some() {
                        return Err(self.invalid(
                            &path,
                            format!(
                                "\"{text}\" is not in the billing currency `{currency}`: a tier counts money paid \
                                 in it (write \"{amount}\" or \"{amount} {currency}\")"
                            ),
                        ));
                    }
                }
                let nanos = self.money(&path, amount)?;
                crate::base::minor_units_of(nanos, currency).ok_or_else(|| {
                    self.invalid(
                        &path,
                        format!("\"{amount}\" is not a whole amount of the smallest unit of {currency}"),
                    )
                })?
            }
        };
        let age = match raw.age.as_deref() {
            None => Duration::ZERO,
            Some(text) => humantime::parse_duration(text.trim()).map_err(|e| {
                self.invalid(
                    &format!("{key}.age"),
                    format!("{e}: write the time since the first payment as a duration such as \"7d\" or \"30d\""),
                )
            })?,
        };
        Ok(TierStep { paid, age })
    }
}

#[cfg(test)]
mod tests {
    use super::{TierSpec, TierStep};
    use crate::base::PlanId;
    use crate::base::Standing;
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ladder(downgrade: bool) -> TierSpec {
        TierSpec {
            name: "api".into(),
            plans: vec!["tier1".into(), "tier2".into(), "tier3".into()],
            steps: vec![
                TierStep::default(),
                TierStep { paid: 5_000, age: 7 * DAY },
                TierStep { paid: 100_000, age: 30 * DAY },
            ],
            downgrade,
        }
    }

    #[test]
    fn a_tenant_moves_to_the_highest_tier_it_reaches_and_down_only_when_the_ladder_says() {
        const T: i64 = 1_773_489_600;
        let d = |days: u64| T + i64::try_from(days * 86_400).unwrap();
        let l = ladder(false);
        let (t1, t2, t3) = (PlanId::from("tier1"), PlanId::from("tier2"), PlanId::from("tier3"));
        let paid = |p| Standing::new(p, Some(T));
        assert_eq!(l.move_of(&t1, paid(4_999), d(30), false), None, "a cent short");
        assert_eq!(l.move_of(&t1, paid(5_000), d(6), false), None, "a day short");
        assert_eq!(l.move_of(&t1, paid(5_000), d(7), false), Some(&t2));
        assert_eq!(l.move_of(&t1, paid(100_000), d(30), false), Some(&t3), "two tiers at once");
        assert_eq!(l.move_of(&t1, Standing::new(0, None), d(30), false), None, "nothing paid");
        assert_eq!(l.move_of(&t3, paid(0), d(0), true), None, "never down");
        assert_eq!(ladder(true).move_of(&t3, paid(4_000), d(30), true), Some(&t1), "down to what it reaches");
        assert_eq!(ladder(true).move_of(&t3, paid(4_000), d(30), false), None, "down only for a reversal");
        assert_eq!(ladder(true).move_of(&t2, paid(5_000), d(7), true), None);
        assert_eq!(l.move_of(&"other".into(), paid(100_000), d(30), false), None, "off the ladder");
        assert_eq!(l.next(&t1, paid(1_000), d(2)), Some((&t2, 4_000, Some(5 * DAY))));
        assert_eq!(l.next(&t1, Standing::new(0, None), d(2)), Some((&t2, 5_000, None)), "waits from a payment");
        assert_eq!(l.next(&t2, paid(200_000), d(40)), Some((&t3, 0, Some(Duration::ZERO))));
        assert_eq!(l.next(&t3, paid(0), d(0)), None, "the top");
        assert_eq!(l.due_at(&t1, paid(5_000)), Some(d(7)), "tier 2's wait");
        assert_eq!(l.due_at(&t1, paid(100_000)), Some(d(7)), "the nearest first");
        assert_eq!(l.due_at(&t2, paid(100_000)), Some(d(30)));
        assert_eq!(l.due_at(&t1, paid(4_000)), None, "not paid for");
        assert_eq!(l.due_at(&t3, paid(100_000)), None, "the top");
    }
}
