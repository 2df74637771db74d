//! Crossings a node saw, waiting to be written to the outbox: found in a store's answer (a lease
//! refill, under the cell's lock, where no store call is made for them), written by the next
//! flush, put-if-absent under their deterministic id.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use sha2::{Digest, Sha256};

use crate::{
    base::{MeterId, Period, PlanId, QuotaMode, TenantId},
    config::{AlertSettings, Config},
    store::{AlertKey, OutboxEntry},
};

/// The most crossings waiting to be written on a node: past it, a new one is dropped (counted)
/// and written when a refill sees it again.
const MAX_PENDING: usize = 10_000;

/// How long a crossing's rows are kept after its period ends (once delivered or dead): past
/// the end, a node can no longer see the crossing again (and write it anew).
pub(crate) const KEPT_AFTER_PERIOD_SECS: i64 = 35 * 86_400;

/// How long the rows of a prepaid balance's crossing are kept (once delivered or dead): a
/// balance has no period end; its crossings are named by its limit and its newest open grant.
pub(crate) const KEPT_FOR_BALANCE_SECS: i64 = 35 * 86_400;

/// A threshold of a quota or a balance, as one crossing names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Threshold {
    /// A percentage of the limit used (`usage.notify_at`).
    Percent(u16),
    /// Units left (`usage.notify_left`).
    Left(u64),
    /// A hard quota's limit, or a balance's, reached.
    Exhausted,
}

impl Threshold {
    /// As the alert's id names it.
    fn tag(self) -> String {
        match self {
            Threshold::Percent(p) => format!("percent:{p}"),
            Threshold::Left(n) => format!("left:{n}"),
            Threshold::Exhausted => "exhausted".to_owned(),
        }
    }
}

/// A crossing of one threshold, as a node saw it in a store's answer.
#[derive(Debug, Clone)]
pub(crate) struct Crossing {
    pub(crate) tenant: TenantId,
    pub(crate) plan: PlanId,
    pub(crate) meter: MeterId,
    pub(crate) period: Period,
    /// The period's bounds (a prepaid balance: its own, the whole time).
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) limit: u64,
    pub(crate) mode: QuotaMode,
    pub(crate) prepaid: bool,
    pub(crate) threshold: Threshold,
    /// The units the fleet had used then (reserved, less what nodes keep in leases and holds).
    pub(crate) used: u64,
    /// When the node saw it (engine clock, Unix seconds).
    pub(crate) at: i64,
    /// A prepaid balance's episode (its newest open grant, read when the crossing is written):
    /// part of its id. Empty for a calendar quota (its period names it).
    pub(crate) episode: String,
    /// A spend cap's currency (its limit and units are nano-units of it); `None` for a quota
    /// or a balance.
    pub(crate) currency: Option<String>,
}

impl Crossing {
    /// Its event type (a documented, versioned schema each).
    pub(crate) fn event(&self) -> &'static str {
        match (self.prepaid, self.threshold) {
            _ if self.currency.is_some() => match self.threshold {
                Threshold::Exhausted => "spend.cap_reached",
                _ => "spend.threshold_crossed",
            },
            (true, Threshold::Exhausted) => "balance.exhausted",
            (true, _) => "balance.low",
            (false, Threshold::Exhausted) => "quota.exhausted",
            (false, _) => "quota.threshold_crossed",
        }
    }

    /// Its id: the same on every node that sees it (tenant, meter, period start, limit,
    /// threshold), in the deployment's identifier namespace (two deployments sending to one
    /// receiver never share an id).
    pub(crate) fn id(&self, namespace: &str) -> String {
        let tagged = format!("{}{}", self.threshold.tag(), self.episode);
        let (start, limit) = (self.start.to_string(), self.limit.to_string());
        alert_id(namespace, &[self.tenant.as_str(), self.meter.as_str(), &start, &limit, &tagged])
    }

    /// Its JSON body (schema version 1): what every delivery of it sends.
    pub(crate) fn body(&self) -> String {
        let time = |secs: i64| {
            chrono::DateTime::from_timestamp(secs, 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default()
        };
        let threshold = match self.threshold {
            Threshold::Percent(p) => serde_json::json!({ "percent": p }),
            Threshold::Left(n) => serde_json::json!({ "left": n }),
            Threshold::Exhausted => serde_json::json!({ "percent": 100 }),
        };
        let mut data = serde_json::json!({
            "version": 1,
            "tenant": self.tenant.as_str(),
            "plan": self.plan.as_str(),
            "meter": self.meter.as_str(),
            "limit": self.limit,
            "used": self.used,
            "threshold": threshold,
        });
        if let Some(currency) = &self.currency {
            data["currency"] = currency.as_str().into();
            data["limit_amount"] = crate::config::amount_of(self.limit).to_string().into();
            data["used_amount"] = crate::config::amount_of(self.used).to_string().into();
        }
        if self.prepaid {
            data["left"] = self.limit.saturating_sub(self.used).into();
        } else {
            data["period"] = serde_json::json!({
                "name": self.period.name(),
                "start": time(self.start),
                "end": time(self.end),
            });
            data["mode"] = match self.mode {
                QuotaMode::Hard => "hard",
                QuotaMode::Soft => "soft",
            }
            .into();
        }
        serde_json::json!({ "type": self.event(), "timestamp": time(self.at), "data": data }).to_string()
    }

    /// Until when its rows are kept once delivered or dead.
    fn keep_until(&self) -> i64 {
        if self.prepaid {
            self.at.saturating_add(KEPT_FOR_BALANCE_SECS)
        } else {
            self.end.saturating_add(KEPT_AFTER_PERIOD_SECS)
        }
    }

    /// Where it goes under `settings` and its tenant's plan (`tenant_alerts`): the operator's
    /// endpoints that take its event type (`endpoint:NAME`), and the tenant's own (`tenant`).
    pub(crate) fn destinations(&self, settings: &AlertSettings, config: &Config) -> Vec<String> {
        let tenant_alerts = config.plan(&self.plan).is_some_and(crate::config::PlanSpec::tenant_alerts);
        destinations(settings, self.event(), tenant_alerts)
    }

    /// Its outbox rows, one per destination.
    pub(crate) fn rows(&self, namespace: &str, destinations: &[String]) -> Vec<OutboxEntry> {
        let row = Row { tenant: &self.tenant, event: self.event(), at: self.at, keep_until: self.keep_until() };
        row.to(&self.id(namespace), &self.body(), destinations)
    }
}

/// What an alert's outbox rows share, whatever the alert.
struct Row<'a> {
    tenant: &'a TenantId,
    event: &'static str,
    at: i64,
    keep_until: i64,
}

impl Row<'_> {
    /// The rows of the alert `id` with `body`, one per destination.
    fn to(&self, id: &str, body: &str, destinations: &[String]) -> Vec<OutboxEntry> {
        destinations
            .iter()
            .map(|to| {
                OutboxEntry::new(
                    AlertKey::new(id.to_owned(), to.clone()),
                    self.tenant.clone(),
                    self.event,
                    body.to_owned(),
                    self.at,
                    self.keep_until,
                )
            })
            .collect()
    }
}

/// An alert's id: the digest of what names it (`parts`, in order), in the deployment's
/// identifier namespace (two deployments sending to one receiver never share an id).
fn alert_id(namespace: &str, parts: &[&str]) -> String {
    let mut digest = Sha256::new().chain_update(b"tollgate alert\0").chain_update(namespace.as_bytes());
    for part in parts {
        digest.update(b"\0");
        digest.update(part.as_bytes());
    }
    format!("alert_{}", hex::encode(&digest.finalize()[..16]))
}

/// Where an alert of type `event` goes: the operator's endpoints that take it
/// (`endpoint:NAME`), and the tenant's own (`tenant`) when its plan sends tenants theirs.
fn destinations(settings: &AlertSettings, event: &str, tenant_alerts: bool) -> Vec<String> {
    let mut to: Vec<String> =
        settings.endpoints.iter().filter(|e| e.wants(event)).map(|e| format!("{ENDPOINT}{}", e.name)).collect();
    if tenant_alerts {
        to.push(TENANT.to_owned());
    }
    to
}

/// A recharge's alert as the outbox holds it (its event, id and body: `recharge.rs`).
impl super::recharge::RechargeAlert {
    /// Its id: the same wherever it is told (tenant, meter, event type, the recharge or the
    /// month it is about).
    pub(crate) fn id(&self, namespace: &str) -> String {
        alert_id(namespace, &[self.tenant.as_str(), self.meter.as_str(), self.event(), &self.about()])
    }

    /// Where it goes: as a crossing's, the tenant's own endpoint when its plan sends tenants
    /// their alerts and it registered one (`tenant_alerts`).
    pub(crate) fn destinations(&self, settings: &AlertSettings, tenant_alerts: bool) -> Vec<String> {
        destinations(settings, self.event(), tenant_alerts)
    }

    /// Its outbox rows, one per destination, the tenant being on `plan`.
    pub(crate) fn rows(&self, namespace: &str, plan: &PlanId, destinations: &[String]) -> Vec<OutboxEntry> {
        let keep_until = self.at.saturating_add(KEPT_FOR_BALANCE_SECS);
        let row = Row { tenant: &self.tenant, event: self.event(), at: self.at, keep_until };
        row.to(&self.id(namespace), &self.body(plan), destinations)
    }
}

/// The destination prefix of an operator's endpoint.
pub(crate) const ENDPOINT: &str = "endpoint:";
/// The destination of a tenant's own endpoint.
pub(crate) const TENANT: &str = "tenant";

/// The crossings this node handed to the outbox for one (tenant, meter): in which period and
/// limit, and which thresholds. A new period or a new limit starts afresh (as the hook's marks
/// do): a balance back at an earlier limit after its grants changed is a new episode.
#[derive(Debug)]
struct Marks {
    start: i64,
    limit: u64,
    /// The period's end (a prepaid balance's: far away), for the bound.
    end: i64,
    done: Vec<Threshold>,
}

/// Crossings waiting to be written, and those this node wrote (or has waiting): each is
/// written once per node while it remembers it, and again (a no-op in the outbox) after a
/// restart or once forgotten.
#[derive(Debug, Default)]
pub(crate) struct AlertQueue {
    /// Each with its number in the queue.
    pending: Mutex<VecDeque<(u64, Crossing, Vec<String>)>>,
    /// The number of the next crossing queued.
    next_seq: std::sync::atomic::AtomicU64,
    marked: Mutex<HashMap<(TenantId, MeterId), Marks>>,
    /// Recharges' alerts waiting to be written (told once, never seen again: kept until
    /// written).
    recharges: Mutex<VecDeque<super::recharge::RechargeAlert>>,
    /// The months whose limit this node saw stop a tenant's recharge (each offered once per
    /// node: the store tells the fleet's first only once, and a first answer lost would lose
    /// the alert). Bounded: cleared when full (offered again: a no-op in the outbox).
    limited: Mutex<std::collections::HashSet<(TenantId, MeterId, i64)>>,
    /// Held by the one write of the queue at a time.
    pub(crate) writing: tokio::sync::Mutex<()>,
}

impl AlertQueue {
    /// Offers crossings a store's answer showed (`destinations` for each, by its event): those
    /// not marked yet wait to be written. Returns how many were dropped (the queue full).
    pub(crate) fn offer(&self, crossed: Vec<(Crossing, Vec<String>)>, cap: usize) -> usize {
        let mut dropped = 0;
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (c, to) in crossed {
            if to.is_empty() {
                continue;
            }
            let key = (c.tenant.clone(), c.meter.clone());
            if !marked.contains_key(&key) && marked.len() >= cap {
                // Bounded: periods over go first; else everything (written again: no-ops).
                let now = c.at;
                marked.retain(|_, m| m.end > now);
                if marked.len() >= cap {
                    marked.clear();
                }
            }
            let m = marked.entry(key).or_insert_with(|| Marks {
                start: c.start,
                limit: c.limit,
                end: c.end,
                done: Vec::new(),
            });
            if (m.start, m.limit) != (c.start, c.limit) {
                *m = Marks { start: c.start, limit: c.limit, end: c.end, done: Vec::new() };
            }
            if m.done.contains(&c.threshold) {
                continue;
            }
            if pending.len() >= MAX_PENDING {
                dropped += 1;
                continue;
            }
            m.done.push(c.threshold);
            let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            pending.push_back((seq, c, to));
        }
        dropped
    }

    /// Offers a recharge's alert (told once, by a store's answer or a webhook): it waits to be
    /// written, unless [`MAX_PENDING`] wait (dropped, logged).
    pub(crate) fn offer_recharge(&self, alert: super::recharge::RechargeAlert) -> bool {
        let mut waiting = self.recharges.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.contains(&alert) {
            return true;
        }
        if waiting.len() >= MAX_PENDING {
            tracing::warn!(tenant = %alert.tenant, event = alert.event(), "alerts: a recharge's alert dropped, too many waiting to be written");
            return false;
        }
        waiting.push_back(alert);
        true
    }

    /// Offers the alert of a month's limit that stopped a recharge, once per node and month
    /// (`cap`: the most months remembered).
    pub(crate) fn offer_limited(&self, alert: super::recharge::RechargeAlert, cap: usize) {
        let super::recharge::RechargeEvent::LimitReached { month } = alert.event else { return };
        let mut seen = self.limited.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= cap {
            seen.clear();
        }
        if seen.insert((alert.tenant.clone(), alert.meter.clone(), month)) {
            drop(seen);
            let _ = self.offer_recharge(alert);
        }
    }

    /// The recharges' alerts waiting to be written, oldest first, left in the queue until
    /// [`recharge_written`](Self::recharge_written) takes each out.
    pub(crate) fn recharges_waiting(&self) -> Vec<super::recharge::RechargeAlert> {
        self.recharges.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// `alert` was written (or has nowhere to go): out of the queue.
    pub(crate) fn recharge_written(&self, alert: &super::recharge::RechargeAlert) {
        let mut waiting = self.recharges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = waiting.iter().position(|a| a == alert) {
            waiting.remove(i);
        }
    }

    /// Whether anything waits to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
            && self.recharges.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// The oldest crossing waiting to be written, with its number, left in the queue until
    /// [`written`](Self::written) takes it out: a write cut short (shutdown's deadline) leaves
    /// it there.
    pub(crate) fn next(&self) -> Option<(u64, Crossing, Vec<String>)> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).front().cloned()
    }

    /// Crossing `seq` was written (or given up: then unmark it): out of the queue, wherever it
    /// is (never another one).
    pub(crate) fn written(&self, seq: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pending.iter().position(|(s, ..)| *s == seq) {
            pending.remove(i);
        }
    }

    /// A crossing whose write failed: unmarked, so that the next refill that sees it offers it
    /// again.
    pub(crate) fn unmark(&self, c: &Crossing) {
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = marked.get_mut(&(c.tenant.clone(), c.meter.clone())) {
            if (m.start, m.limit) == (c.start, c.limit) {
                m.done.retain(|t| *t != c.threshold);
            }
        }
    }

    /// How many crossings wait.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crossing(threshold: Threshold, prepaid: bool) -> Crossing {
        Crossing {
            tenant: "acme".into(),
            plan: "pro".into(),
            meter: "tokens".into(),
            period: if prepaid { Period::Prepaid } else { Period::Month { anchor_day: 1 } },
            start: 1_772_323_200,
            end: 1_775_001_600,
            limit: 1_000,
            mode: QuotaMode::Hard,
            prepaid,
            threshold,
            used: 812,
            at: 1_773_489_600,
            episode: String::new(),
            currency: None,
        }
    }

    #[test]
    fn a_crossing_has_one_id_its_event_and_a_body_of_schema_1() {
        let c = crossing(Threshold::Percent(80), false);
        assert_eq!(c.id("ns"), crossing(Threshold::Percent(80), false).id("ns"), "deterministic");
        assert_ne!(c.id("ns"), c.id("other"), "per deployment");
        assert_ne!(c.id("ns"), crossing(Threshold::Percent(90), false).id("ns"));
        assert!(c.id("ns").starts_with("alert_") && c.id("ns").len() == 38);
        // Pinned: nodes of every version name a crossing alike (put-if-absent dedups by it).
        assert_eq!(c.id("ns"), "alert_dfa4c85d62f3cf9d785518b27aa9f231");
        let body: serde_json::Value = serde_json::from_str(&c.body()).unwrap();
        assert_eq!(body["type"], "quota.threshold_crossed");
        assert_eq!(body["timestamp"], "2026-03-14T12:00:00Z");
        assert_eq!(body["data"]["version"], 1);
        assert_eq!(body["data"]["threshold"]["percent"], 80);
        assert_eq!(body["data"]["period"]["start"], "2026-03-01T00:00:00Z");
        assert_eq!(body["data"]["mode"], "hard");
        assert_eq!(crossing(Threshold::Exhausted, false).event(), "quota.exhausted");
        assert_eq!(crossing(Threshold::Left(100), true).event(), "balance.low");
        let mut again = crossing(Threshold::Left(100), true);
        let first = again.id("ns");
        again.episode = "grant:1:g2".into();
        assert_ne!(again.id("ns"), first, "another episode of the balance");
        let balance: serde_json::Value = serde_json::from_str(&crossing(Threshold::Exhausted, true).body()).unwrap();
        assert_eq!(
            (balance["type"].as_str(), balance["data"]["left"].as_u64()),
            (Some("balance.exhausted"), Some(188))
        );
    }

    #[test]
    fn a_months_limit_is_offered_once_per_node_and_the_memo_is_bounded() {
        use super::super::recharge::{RechargeAlert, RechargeEvent};
        let q = AlertQueue::default();
        let limited = |tenant: &str, month: i64, at: i64| RechargeAlert {
            tenant: tenant.into(),
            meter: "tokens".into(),
            event: RechargeEvent::LimitReached { month },
            at,
        };
        q.offer_limited(limited("a", 1, 10), 3);
        q.offer_limited(limited("a", 1, 11), 3);
        assert_eq!(q.recharges_waiting().len(), 1, "once per node and month, whenever seen");
        q.recharge_written(&limited("a", 1, 10));
        q.offer_limited(limited("a", 1, 12), 3);
        assert!(q.recharges_waiting().is_empty(), "written: not offered again");
        q.offer_limited(limited("a", 2, 13), 3);
        assert_eq!(q.recharges_waiting().len(), 1, "the next month");
        for t in 0..10 {
            q.offer_limited(limited(&format!("t{t}"), 1, 14), 3);
        }
        assert!(q.limited.lock().unwrap().len() <= 3, "bounded");
    }

    #[test]
    fn a_crossing_is_offered_once_until_unmarked_and_the_marks_are_bounded() {
        let q = AlertQueue::default();
        let to = vec![TENANT.to_owned()];
        let c = crossing(Threshold::Percent(80), false);
        assert_eq!(q.offer(vec![(c.clone(), to.clone()), (c.clone(), to.clone())], 100), 0);
        assert_eq!(q.waiting(), 1);
        let (seq, ..) = q.next().unwrap();
        q.written(seq);
        q.written(seq);
        q.offer(vec![(c.clone(), to.clone())], 100);
        assert_eq!(q.waiting(), 0, "written already");
        q.unmark(&c);
        q.offer(vec![(c.clone(), to.clone())], 100);
        assert_eq!(q.waiting(), 1, "its write failed: offered again");
        q.offer(vec![(crossing(Threshold::Percent(90), false), Vec::new())], 100);
        assert_eq!(q.waiting(), 1, "nowhere to go: nothing written");
        // A writer's `written` takes out its own crossing, never one another writer has not
        // written (two writers at once).
        q.offer(vec![(crossing(Threshold::Percent(95), false), to.clone())], 100);
        let (first, ..) = q.next().unwrap();
        q.written(first);
        q.written(first);
        assert_eq!(q.waiting(), 1, "the second crossing is still there");
        // A balance whose limit changed and came back: a new episode, offered again.
        let mut b = crossing(Threshold::Left(100), true);
        q.offer(vec![(b.clone(), to.clone())], 100);
        b.limit = 2_000;
        q.offer(vec![(b.clone(), to.clone())], 100);
        b.limit = 1_000;
        let before = q.waiting();
        q.offer(vec![(b.clone(), to.clone())], 100);
        assert_eq!(q.waiting(), before + 1);
        for t in 0..10 {
            let mut c = crossing(Threshold::Percent(50), false);
            c.tenant = format!("t{t}").into();
            q.offer(vec![(c, to.clone())], 4);
        }
        assert!(q.marked.lock().unwrap().len() <= 4);
    }
}
