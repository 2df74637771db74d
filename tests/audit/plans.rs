//! `d`, a tenant of the store's directory that the operator moves between plans and gives an
//! override of its quota mid-period (`Admin::set_plan`, `Admin::set_overrides`, through a
//! node's admin whose store calls meet the faults), and its Stripe subscription moves too (its
//! events delivered late, again and out of order), and what the ledger checks of it: the
//! period's counters carry over every move, so what it is served stays within the highest
//! limit it may have had, and a node alone at the end is served exactly what the limits in
//! force leave.

use tollgate::admin::Admin;

use crate::{
    common::{req, Harness},
    fleet::{Fleet, REQUESTS_LIMIT, TOKENS_LIMIT},
    ops::Who,
};

/// The hard limits of plan `quota_large`'s month.
pub(crate) const LARGE_REQUESTS_LIMIT: u64 = 180;
pub(crate) const LARGE_TOKENS_LIMIT: u64 = 6_000;
/// Plan `quota_large`'s limits in the configuration some reloads bring (a deploy that raises
/// them mid-period).
pub(crate) const RAISED_REQUESTS_LIMIT: u64 = 200;
pub(crate) const RAISED_TOKENS_LIMIT: u64 = 7_000;

/// The fleet's configuration `toml` with plan `quota_large`'s limits raised.
pub(crate) fn raised_large(toml: &str) -> String {
    let raised = toml
        .replace(&format!("limit = {LARGE_REQUESTS_LIMIT},"), &format!("limit = {RAISED_REQUESTS_LIMIT},"))
        .replace(&format!("limit = {LARGE_TOKENS_LIMIT},"), &format!("limit = {RAISED_TOKENS_LIMIT},"));
    assert_eq!(raised.matches("limit = ").count(), toml.matches("limit = ").count());
    assert_ne!(raised, toml, "the limits are named as config() writes them");
    raised
}

/// The tokens of `d`'s override of its plan's quota: fewer than it uses in most seeds, so
/// that an override set mid-run refuses it, and one cleared serves it again.
pub(crate) const OVERRIDE_TOKENS_LIMIT: u64 = 400;

const PLANS: [&str; 2] = ["quota", "quota_large"];
/// The prices of `d`'s subscription that `[stripe.prices]` maps to each plan.
const PRICES: [&str; 2] = ["price_quota", "price_quota_large"];

/// The override the operator gives `d`: a month of fewer tokens than either plan's.
fn override_json() -> String {
    format!(
        r#"{{"quotas": {{"tokens": {{"limit": {OVERRIDE_TOKENS_LIMIT}, "period": "month", "mode": "hard", "lease": 100}}}}}}"#
    )
}

/// `d`'s monthly limits (requests, tokens) on plan `plan` (0, 1), with the override or not.
fn limits(plan: u8, overridden: bool) -> (u64, u64) {
    let (requests, tokens) =
        if plan == 0 { (REQUESTS_LIMIT, TOKENS_LIMIT) } else { (LARGE_REQUESTS_LIMIT, LARGE_TOKENS_LIMIT) };
    (requests, if overridden { OVERRIDE_TOKENS_LIMIT } else { tokens })
}

impl Fleet {
    /// The operator moves `d` through the node in `slot`: to plan `quota` (`to` 0) or
    /// `quota_large` (1), or sets (2) or clears (3) its override. Whatever the answer, the
    /// change may be in force (an answer lost).
    pub(crate) async fn change_plan(&mut self, slot: u8, to: u8) {
        let (h, _) = self.at(slot);
        self.tally.d_changed();
        let admin = Admin::for_engine(&h.tollgate);
        let id = Who::D.id();
        let done = match to % 4 {
            plan @ (0 | 1) => {
                self.d_plans.insert(plan);
                admin.set_plan(id, PLANS[usize::from(plan)]).await.map(drop)
            }
            2 => {
                self.d_overridden.insert(true);
                admin.set_overrides(id, Some(&override_json())).await.map(drop)
            }
            _ => {
                self.d_overridden.insert(false);
                admin.set_overrides(id, None).await.map(drop)
            }
        };
        if std::env::var_os("AUDIT_VERBOSE").is_some() {
            eprintln!("d's plan change {to} on slot {slot}: {done:?}");
        }
    }

    /// `d`'s subscription moves it to plan `to` (0: `quota`, 1: `quota_large`: its price,
    /// `customer.subscription.updated`) or ends (2: `customer.subscription.deleted`, its
    /// status `canceled`, which `[stripe.subscription_status]` maps to `quota`), the event
    /// queued `copies` times (Stripe's redeliveries; delivered in any order, an older one is
    /// stale).
    pub(crate) fn subscribe(&mut self, to: u8, copies: u8) {
        let to = to % 3;
        let plan = if to == 1 { 1 } else { 0 };
        self.d_plans.insert(plan);
        self.tally.d_changed();
        let mut sub = crate::fleet::fixtures()["subscription"].clone();
        sub["id"] = serde_json::json!("sub_audit_d");
        sub["customer"] = serde_json::json!(Who::D.customer());
        sub["created"] = serde_json::json!(crate::common::NOON);
        sub["status"] = serde_json::json!(if to == 2 { "canceled" } else { "active" });
        sub["items"]["data"][0]["price"]["id"] = serde_json::json!(PRICES[usize::from(plan)]);
        sub["items"]["data"][0]["price"]["lookup_key"] = serde_json::Value::Null;
        let kind = if to == 2 { "customer.subscription.deleted" } else { "customer.subscription.updated" };
        let payload = self.event(&self.next_event(), kind, sub);
        for _ in 0..copies.max(1) {
            self.queue.push(crate::fleet::Delivery { payload: payload.clone() });
        }
    }

    /// The highest limits (requests, tokens) `d` may have had in force, on any node's
    /// configuration.
    pub(crate) fn d_highest(&self) -> (u64, u64) {
        let mut highest = (0, 0);
        for &plan in &self.d_plans {
            for &overridden in &self.d_overridden {
                let (r, t) = limits(plan, overridden);
                let (r, t) = match (plan, self.large_raised) {
                    (1, true) => (RAISED_REQUESTS_LIMIT, if overridden { t } else { RAISED_TOKENS_LIMIT }),
                    _ => (r, t),
                };
                highest = (highest.0.max(r), highest.1.max(t));
            }
        }
        highest
    }
}

/// `d`'s limits in force at the end, as the directory holds its plan and overrides (read
/// beneath the faults).
pub(crate) async fn d_limits(fleet: &Fleet, v: &mut Vec<String>) -> Option<(u64, u64)> {
    match fleet.stores.usage.tenant(&Who::D.id().into()).await {
        Ok(Some(record)) => {
            let plan = u8::try_from(PLANS.iter().position(|p| *p == record.plan.as_str()).unwrap_or(9)).unwrap();
            if plan > 1 {
                v.push(format!("plans: d is on a plan never asked for: {}", record.plan));
                return None;
            }
            Some(limits(plan, record.overrides.is_some()))
        }
        other => {
            v.push(format!("plans: d's record could not be read: {other:?}"));
            None
        }
    }
}

/// Nothing stranded for `d`: a node alone is served exactly what its limits in force leave,
/// a hold of the tokens and then the requests (each hold is a request). Returns nothing; what
/// it served is tallied.
pub(crate) async fn d_alone(
    fleet: &Fleet,
    alone: &Harness,
    (requests_limit, tokens_limit): (u64, u64),
    (requests, tokens): (u64, u64),
    v: &mut Vec<String>,
) {
    let tokens_left = tokens_limit.saturating_sub(tokens);
    let charged = if requests + 2 <= requests_limit {
        crate::ledger::stranded(fleet, alone, Who::D, tokens_left, "d's tokens", v).await
    } else {
        0
    };
    let requests_left = requests_limit.saturating_sub(requests + charged);
    let mut served = 0;
    for _ in 0..=requests_left {
        if alone.send(req("GET", "/items", Some(Who::D.key()), None)).await.status.as_u16() == 200 {
            served += 1;
        }
    }
    fleet.tally.add(usize::MAX, Who::D, "requests", served);
    if served != requests_left {
        v.push(format!(
            "nothing stranded: d's requests: a node alone was served {served}; its limit {requests_limit} left \
             {requests_left}"
        ));
    }
}
