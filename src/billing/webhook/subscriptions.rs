//! A tenant's subscriptions as the webhooks last saw them, ordered per subscription, and the
//! plan changes of a customer's and a subscription's events applied over them.

use super::{
    transition::{canceled_plan, transition, Fields},
    WebhookHandler, WebhookOutcome,
};
use crate::{
    config::{Config, PlanId, StripeSettings},
    store::{PastDue, PlanChange, PlanChangeOutcome},
};

impl WebhookHandler {
    /// An event of the customer, not of one of its subscriptions (`[stripe.events]`, such as
    /// `payment_method.attached`): it moves the tenant only while no live subscription gives
    /// it a plan. The write is conditional on the subscriptions and plan as read, and records
    /// the event's time among the subscriptions, so a subscription's event, or a newer
    /// customer event, that lands meanwhile makes it read again.
    pub(super) async fn customer_event(
        &self,
        config: &Config,
        settings: &StripeSettings,
        fields: &Fields,
        customer: &str,
        plan: PlanId,
    ) -> WebhookOutcome {
        for _ in 0..8 {
            let record = match self.directory.tenant_by_customer(customer).await {
                Ok(Some(record)) => record,
                Ok(None) => {
                    let change = PlanChange::new(fields.id.clone(), customer.to_owned(), fields.created, plan.clone());
                    let result = self.directory.apply_plan_change(&change).await;
                    return self.settle(config, fields, customer, (None, &plan), result).await;
                }
                Err(e) => return self.settle(config, fields, customer, (None, &plan), Err(e)).await,
            };
            let (mut subs, legacy) = match Subscriptions::of(fields, &record) {
                Ok(read) => read,
                Err(outcome) => return outcome,
            };
            // No subscription event stored yet: what its subscriptions give is unknown, and they
            // stay so (`legacy`, kept for its first subscription event's rules).
            subs.legacy = legacy;
            if record.last_event_at.is_some_and(|last| last > fields.created)
                || subs.customer_at.is_some_and(|last| last > fields.created)
            {
                tracing::info!(event = %fields.id, %customer, "Stripe webhook older than the last applied: ignored");
                return WebhookOutcome::Stale;
            }
            // Without stored subscriptions, a plan a price gives stands for a live subscription
            // that gives it (a tenant from before, or one set on its plan by hand).
            let priced = legacy && settings.prices.values().any(|p| p.same_plan(&record.plan));
            if let Some(best) = subs.best(&Order::new(settings)).or_else(|| priced.then(|| record.plan.clone())) {
                tracing::info!(event = %fields.id, kind = %fields.kind, tenant = %record.id, %best, mapped = %plan,
                    "Stripe webhook of the customer ignored: a live subscription gives the plan \
                     (dunning goes through [stripe.subscription_status])");
                return WebhookOutcome::Ignored;
            }
            subs.customer_at = Some(fields.created);
            let plan = config.moved_to(&record.plan, plan.clone());
            let change = PlanChange::new(fields.id.clone(), customer.to_owned(), fields.created, plan.clone())
                .with_subscriptions(&record, subs.to_json());
            match self.directory.apply_plan_change(&change).await {
                Ok(PlanChangeOutcome::Changed) => {}
                result => return self.settle(config, fields, customer, (Some(&record.plan), &plan), result).await,
            }
        }
        WebhookOutcome::StoreFailed("the tenant's subscriptions kept changing under concurrent events".into())
    }

    /// A subscription's event: ordered by its subscription (by `created`, ties broken by the
    /// event's meaning: created, then updated, then deleted), recorded with the tenant's other
    /// subscriptions, and the tenant's plan computed from every live one: the highest of the
    /// plans they give (`[stripe] plan_order`); with none left after a subscription that gave
    /// one ended, the canceled outcome. A subscription that gives no plan (an add-on on a price
    /// `[stripe.prices]` does not map) never moves the tenant.
    pub(super) async fn subscription_event(
        &self,
        config: &Config,
        settings: &StripeSettings,
        fields: &Fields,
        subscription: &str,
    ) -> WebhookOutcome {
        let Some(customer) = fields.customer.clone() else {
            tracing::warn!(event = %fields.id, kind = %fields.kind, "Stripe webhook ignored: it names no customer");
            return WebhookOutcome::Ignored;
        };
        let rank = event_rank(&fields.kind);
        let status = fields.status.as_deref().unwrap_or_default();
        let ended =
            fields.kind == "customer.subscription.deleted" || matches!(status, "canceled" | "incomplete_expired");
        let by_price = fields.prices.iter().find_map(|p| settings.prices.get(p)).cloned();
        let transition = transition(settings, fields);
        // What the subscription gives after the event: a plan, nothing, or what it gave before
        // (a status mapped to `ignore`, or no transition configured).
        let gives: Option<Option<PlanId>> = match (&transition, ended) {
            (_, true) | (Err(()), _) => Some(None),
            (Ok(Some(plan)), false) => Some(Some(plan.clone())),
            (Ok(None), false) => None,
        };
        // Past due with a grace (`[stripe] past_due_grace`): the plan past due moves to, and
        // how long the subscription keeps giving what it gave.
        let spell = match (status, settings.past_due_grace, &transition) {
            ("past_due", Some(grace), Ok(Some(then))) if !ended => Some((grace_secs(grace), then.clone())),
            _ => None,
        };
        for _ in 0..8 {
            let record = match self.directory.tenant_by_customer(&customer).await {
                Ok(Some(record)) => record,
                Ok(None) => {
                    return self
                        .settle(
                            config,
                            fields,
                            &customer,
                            (None, &PlanId::from("")),
                            Ok(PlanChangeOutcome::UnknownCustomer),
                        )
                        .await
                }
                Err(e) => return self.settle(config, fields, &customer, (None, &PlanId::from("")), Err(e)).await,
            };
            let (mut subs, legacy) = match Subscriptions::of(fields, &record) {
                Ok(read) => read,
                Err(outcome) => return outcome,
            };
            // From this event on they are stored.
            subs.legacy = false;
            let before = subs.subs.get(subscription).cloned();
            let stale = match &before {
                Some(b) => (b.at, b.rank) > (fields.created, rank),
                // Older than what was forgotten (or, before this version, than the last event).
                None => fields.created < subs.floor,
            };
            if stale {
                tracing::info!(event = %fields.id, %customer, subscription,
                    "Stripe webhook older than the last applied for its subscription: ignored");
                return WebhookOutcome::Stale;
            }
            let gave = before.as_ref().and_then(|b| b.plan.as_deref().map(PlanId::from));
            let bore = before.as_ref().is_some_and(|b| b.bore) || gave.is_some();
            // Past due: the grace counts from the first past-due event of this spell (an event
            // of another status ends the spell). Within it the subscription gives the plan its
            // price maps to, else the one it gave; once it is over, the past-due plan.
            let mut gives = gives.clone();
            let mut grace = None;
            let due = spell.as_ref().map(|(secs, then)| {
                let until = before
                    .as_ref()
                    .and_then(|b| b.due.as_ref())
                    .map_or_else(|| fields.created.saturating_add(*secs), |d| d.at);
                let keep = by_price.clone().or_else(|| gave.clone()).filter(|keep| keep != then);
                if let Some(keep) = keep.filter(|_| until > self.clock.unix_secs()) {
                    gives = Some(Some(keep));
                    grace = Some(PastDue::new(until, then.clone()));
                }
                Due { at: until, plan: then.as_str().to_owned() }
            });
            let now_gives = gives.clone().unwrap_or_else(|| gave.clone());
            // A subscription that gives (or gave) a plan: its end, or its move to a price no
            // plan maps, moves the tenant.
            let bearing = bore || by_price.is_some();
            let lost_plan = bearing && now_gives.is_none();
            let order = Order::new(settings);
            let best_before = subs.best(&order);
            let plan_text = now_gives.as_ref().map(|p| p.as_str().to_owned());
            let bore_now = bore || now_gives.is_some();
            subs.subs.insert(
                subscription.to_owned(),
                Sub { at: fields.created, rank, plan: plan_text, bore: bore_now, due },
            );
            subs.prune();
            let best = subs.best(&order);
            let plan = if legacy {
                match (&gives, ended) {
                    (Some(Some(plan)), _) => plan.clone(),
                    (_, true) if by_price.is_some() => canceled_plan(settings).unwrap_or_else(|| record.plan.clone()),
                    _ => record.plan.clone(),
                }
            } else {
                match best {
                    // Written only when the best changes or this subscription gives it anew: a
                    // plan set by hand survives an add-on's event or an ignored status.
                    Some(best) if best_before.as_ref() != Some(&best) || matches!(gives, Some(Some(_))) => best,
                    Some(_) => record.plan.clone(),
                    None if lost_plan => canceled_plan(settings).unwrap_or_else(|| record.plan.clone()),
                    None => record.plan.clone(),
                }
            };
            let plan = config.moved_to(&record.plan, plan);
            let moved = matches!(gives, Some(Some(_)))
                || (lost_plan && !legacy)
                || (ended && by_price.is_some())
                || plan != record.plan;
            let written = subs.to_json();
            // Told only when the grace's end would move the tenant (another subscription may
            // give as high a plan).
            let grace = grace.and_then(|_| past_due(config, Some(&written)));
            let change = PlanChange::new(fields.id.clone(), customer.clone(), fields.created, plan.clone())
                .with_subscriptions(&record, written);
            match self.directory.apply_plan_change(&change).await {
                Ok(PlanChangeOutcome::Changed) => {}
                Ok(PlanChangeOutcome::Applied(_)) if !moved => {
                    // Recorded (its order holds for later events), nothing moved.
                    return match transition {
                        Err(()) => {
                            tracing::warn!(event = %fields.id, prices = ?fields.prices,
                                "Stripe webhook: the subscription's prices are not in [stripe.prices]; the plan follows the customer's other subscriptions");
                            WebhookOutcome::UnknownPrice
                        }
                        _ => {
                            tracing::info!(event = %fields.id, kind = %fields.kind, status = ?fields.status,
                                "Stripe webhook recorded: no transition configured, the plan is unchanged");
                            WebhookOutcome::Ignored
                        }
                    };
                }
                result => {
                    let settled = self.settle(config, fields, &customer, (Some(&record.plan), &plan), result).await;
                    return match (settled, grace) {
                        (WebhookOutcome::Applied { tenant, plan }, Some(grace)) => {
                            tracing::info!(event = %fields.id, %tenant, %plan, until = grace.until, then = %grace.plan,
                                "Stripe webhook: the subscription is past due; the tenant keeps its plan through the grace");
                            WebhookOutcome::PastDue { tenant, plan, until: grace.until, then: grace.plan }
                        }
                        (outcome, _) => outcome,
                    };
                }
            }
        }
        WebhookOutcome::StoreFailed("the tenant's subscriptions kept changing under concurrent events".into())
    }

    /// Ends the graces that are over (`[stripe] past_due_grace`): every tenant of the directory
    /// with a subscription past due whose grace ended by now moves to the past-due plan (and
    /// its plan follows every live subscription, as at an event). The worker runs it every
    /// 10 minutes on each node ([`Tollgate::check_past_due`](crate::Tollgate::check_past_due));
    /// a move is made once across a fleet, conditional on the tenant's subscriptions as read,
    /// its id (`grace_SUBSCRIPTION_UNTIL`) marked seen as an event's. Reads the directory a page
    /// of 1,000 tenants at a time. Returns how many tenants moved.
    ///
    /// # Errors
    /// The directory's failure to list its tenants (the next pass tries again). A tenant whose
    /// move fails is logged and passed.
    pub async fn end_graces(&self) -> Result<usize, crate::store::StoreError> {
        const PAGE: usize = 1_000;
        let config = (self.config)();
        let Some(settings) = config.stripe().filter(|s| s.past_due_grace.is_some()) else { return Ok(0) };
        let mut after: Option<crate::config::TenantId> = None;
        let mut moved = 0;
        loop {
            let page = self.directory.list_tenants(after.as_ref(), PAGE).await?;
            let full = page.len() == PAGE;
            after = page.last().map(|t| t.id.clone());
            for record in page {
                let now = self.clock.unix_secs();
                if over(record.subscriptions.as_deref(), now).is_none() {
                    continue;
                }
                let tenant = record.id.clone();
                match self.end_grace(&config, settings, record).await {
                    Ok(true) => moved += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(%tenant, error = %e,
                        "past due: the move at the grace's end failed; tried again at the next pass"),
                }
            }
            if !full {
                return Ok(moved);
            }
        }
    }

    /// One tenant's graces that are over, ended: read again while its subscriptions change.
    async fn end_grace(
        &self,
        config: &Config,
        settings: &StripeSettings,
        mut record: crate::store::TenantRecord,
    ) -> Result<bool, crate::store::StoreError> {
        for _ in 0..8 {
            let now = self.clock.unix_secs();
            let Some((id, at, until)) = over(record.subscriptions.as_deref(), now) else { return Ok(false) };
            let Some(customer) = record.customer.clone() else { return Ok(false) };
            let Ok(mut subs) = Subscriptions::parse(record.subscriptions.as_deref()) else { return Ok(false) };
            let order = Order::new(settings);
            let best_before = subs.best(&order);
            for sub in subs.subs.values_mut() {
                if let Some(due) = sub.due.as_ref().filter(|d| d.at <= now) {
                    sub.plan = Some(due.plan.clone());
                }
            }
            let plan = match subs.best(&order) {
                Some(best) if best_before.as_ref() != Some(&best) => config.moved_to(&record.plan, best),
                _ => record.plan.clone(),
            };
            let change = PlanChange::new(format!("grace_{id}_{until}"), customer.clone(), at, plan.clone())
                .with_subscriptions(&record, subs.to_json());
            match self.directory.apply_plan_change(&change).await? {
                PlanChangeOutcome::Applied(stored) => {
                    self.node.tenant_changed(&stored.id);
                    crate::store::tell_changed(
                        self.directory.as_ref(),
                        &stored.id,
                        self.clock.unix_nanos() / 1_000_000,
                    )
                    .await;
                    tracing::info!(tenant = %stored.id, from = %record.plan, plan = %stored.plan, subscription = %id,
                        "past due: the grace is over, the tenant moved");
                    let actor = crate::store::Actor::Tollgate("grace-ended".to_owned());
                    self.record_plan(&stored.id, actor, Some(&record.plan), &stored.plan).await;
                    return Ok(stored.plan != record.plan);
                }
                PlanChangeOutcome::Changed => {
                    let Some(again) = self.directory.tenant(&record.id).await? else { return Ok(false) };
                    record = again;
                }
                // Made by another node, or the tenant is gone.
                _ => return Ok(false),
            }
        }
        Err(crate::store::StoreError::Conflict("the tenant's subscriptions kept changing"))
    }

    /// The outcome of a plan change the store answered.
    async fn settle(
        &self,
        config: &Config,
        fields: &Fields,
        customer: &str,
        (from, plan): (Option<&PlanId>, &PlanId),
        result: Result<PlanChangeOutcome, crate::store::StoreError>,
    ) -> WebhookOutcome {
        match result {
            Ok(PlanChangeOutcome::Applied(record)) => {
                // The tenant's overrides are checked over the new plan as `Admin::set_plan`
                // checks them. The customer paid for the plan: it is applied whatever they say,
                // and nodes serve it without overrides that do not fit (counted there).
                if let Some(json) = record.overrides.as_deref().filter(|o| !o.trim().is_empty()) {
                    let fits = crate::config::PlanOverride::from_json(json, config)
                        .map_err(|e| e.to_string())
                        .and_then(|o| config.check_override(&record.plan, &o));
                    if let Err(why) = fits {
                        tracing::error!(event = %fields.id, tenant = %record.id, plan = %record.plan,
                            "the tenant's overrides do not fit the plan a Stripe webhook moved it to ({why}): \
                             it is served the plan without them until they are mended (tollgate tenants set-override)");
                    }
                }
                self.node.tenant_changed(&record.id);
                // Every other node reads it again within a second.
                crate::store::tell_changed(self.directory.as_ref(), &record.id, self.clock.unix_nanos() / 1_000_000)
                    .await;
                tracing::info!(event = %fields.id, kind = %fields.kind, tenant = %record.id, plan = %record.plan,
                    "plan changed by a Stripe webhook");
                self.record_plan(&record.id, crate::store::Actor::Stripe(fields.id.clone()), from, &record.plan).await;
                WebhookOutcome::Applied { tenant: record.id, plan: record.plan }
            }
            Ok(PlanChangeOutcome::Duplicate) => WebhookOutcome::Duplicate,
            Ok(PlanChangeOutcome::Stale) => {
                tracing::info!(event = %fields.id, %customer, "Stripe webhook older than the last applied: ignored");
                WebhookOutcome::Stale
            }
            Ok(PlanChangeOutcome::UnknownCustomer) => {
                if let Some(t) = config.tenants().iter().find(|t| t.stripe_customer() == Some(customer)) {
                    tracing::warn!(event = %fields.id, %customer, tenant = %t.id(), %plan,
                        "Stripe webhook for a tenant declared in the configuration file: its plan is the file's, \
                         nothing changed (change it in the file, or move the tenant to the store's directory)");
                    return WebhookOutcome::FileTenant { tenant: t.id().clone() };
                }
                tracing::warn!(event = %fields.id, %customer, "Stripe webhook for a customer no tenant has: ignored");
                WebhookOutcome::UnknownCustomer
            }
            Ok(PlanChangeOutcome::Changed) => {
                // Only a subscription's change is answered Changed; its caller reads again.
                WebhookOutcome::StoreFailed("the tenant changed meanwhile".into())
            }
            Err(e) => {
                tracing::error!(event = %fields.id, error = %e, "Stripe webhook not applied: the store failed");
                WebhookOutcome::StoreFailed(e.to_string())
            }
        }
    }
}

/// Events of one subscription in one second are ordered by their meaning: created, then
/// updated (and the others), then deleted.
fn event_rank(kind: &str) -> u8 {
    match kind {
        "customer.subscription.created" => 0,
        "customer.subscription.deleted" => 2,
        _ => 1,
    }
}

/// One subscription as the webhooks last saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Sub {
    /// Its last event's `created`, and that event's rank ([`event_rank`]).
    at: i64,
    rank: u8,
    /// The plan it gives; `None` once ended, or when its prices map to no plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan: Option<String>,
    /// Whether it ever gave a plan: its end, or its move to a price no plan maps, then moves
    /// the tenant.
    #[serde(default)]
    bore: bool,
    /// Past due with a grace: when it ends and the plan the subscription gives then. Kept
    /// (the spell's start) until an event of another status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due: Option<Due>,
}

/// A subscription's grace past due (`[stripe] past_due_grace`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Due {
    /// When it ends (Unix seconds).
    at: i64,
    /// The plan the subscription gives from then.
    plan: String,
}

/// A grace in whole seconds.
fn grace_secs(grace: std::time::Duration) -> i64 {
    i64::try_from(grace.as_secs()).unwrap_or(i64::MAX)
}

/// The first subscription whose grace is over at `now` and that still gives another plan than
/// the past-due one: its id, its last event's time and the grace's end.
fn over(subscriptions: Option<&str>, now: i64) -> Option<(String, i64, i64)> {
    let text = subscriptions.filter(|t| t.contains("\"due\""))?;
    let subs = Subscriptions::parse(Some(text)).ok()?;
    subs.subs.iter().find_map(|(id, s)| {
        let due = s.due.as_ref().filter(|d| d.at <= now && s.plan.as_deref() != Some(d.plan.as_str()))?;
        Some((id.clone(), s.at, due.at))
    })
}

/// The grace a tenant is in, from its stored subscriptions: the earliest end among its
/// subscriptions past due that still give a plan, when their move changes the tenant's plan
/// (another live subscription giving as high a plan keeps it). `None` without one, or when
/// `[stripe] past_due_grace` is not set.
pub(crate) fn past_due(config: &Config, subscriptions: Option<&str>) -> Option<PastDue> {
    let settings = config.stripe().filter(|s| s.past_due_grace.is_some())?;
    let text = subscriptions.filter(|t| t.contains("\"due\""))?;
    let subs = Subscriptions::parse(Some(text)).ok()?;
    let (until, then) = subs
        .subs
        .values()
        .filter_map(|s| s.due.as_ref().filter(|d| s.plan.as_deref() != Some(d.plan.as_str())))
        .map(|d| (d.at, d.plan.clone()))
        .min()?;
    let order = Order::new(settings);
    let mut after = Subscriptions { subs: subs.subs.clone(), ..Subscriptions::default() };
    for sub in after.subs.values_mut() {
        if let Some(due) = &sub.due {
            sub.plan = Some(due.plan.clone());
        }
    }
    let name = |p: Option<PlanId>| p.map(|p| p.name().to_owned());
    (name(after.best(&order)) != name(subs.best(&order))).then(|| PastDue::new(until, PlanId::from(then.as_str())))
}

/// A tenant's subscriptions by id ([`TenantRecord::subscriptions`](crate::store::TenantRecord::subscriptions)),
/// and the time below which a subscription not kept is stale (what was forgotten).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Subscriptions {
    #[serde(default)]
    floor: i64,
    subs: std::collections::BTreeMap<String, Sub>,
    /// The `created` of the last event of the customer (not of a subscription) applied: an
    /// older one is stale, and writing it makes concurrent customer events conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    customer_at: Option<i64>,
    /// Written by a customer's event alone: no subscription event was stored yet, so the
    /// tenant's first one follows the rules of a tenant from before subscriptions were stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    legacy: bool,
}

/// How plans rank: `[stripe] plan_order` first, then the plans prices give, then the rest.
struct Order<'a> {
    listed: &'a [PlanId],
    priced: std::collections::BTreeSet<&'a str>,
}

impl<'a> Order<'a> {
    fn new(settings: &'a StripeSettings) -> Self {
        Self { listed: &settings.plan_order, priced: settings.prices.values().map(PlanId::name).collect() }
    }

    /// Lower is higher; every version of a plan ranks as the plan.
    fn rank(&self, plan: &str) -> usize {
        let plan = PlanId::from(plan);
        let plan = plan.name();
        match self.listed.iter().position(|o| o.name() == plan) {
            Some(i) => i,
            None if self.priced.contains(plan) => self.listed.len(),
            None => self.listed.len() + 1,
        }
    }
}

impl Subscriptions {
    /// At most this many are kept per tenant: those giving no plan go first, oldest first.
    const MAX: usize = 32;

    /// The tenant's subscriptions as stored, and whether no subscription event of it was
    /// stored yet (from before this version, or only its customer's events since): then its
    /// last event orders them all, and its plan follows one event alone, as before. Unreadable
    /// ones are never written over (their order and ended subscriptions would be lost).
    fn of(fields: &Fields, record: &crate::store::TenantRecord) -> Result<(Self, bool), WebhookOutcome> {
        let mut subs = Self::parse(record.subscriptions.as_deref()).map_err(|e| {
            tracing::error!(event = %fields.id, tenant = %record.id, error = %e,
                "the tenant's stored subscriptions are unreadable: the event is not applied");
            WebhookOutcome::StoreFailed(format!("the tenant's stored subscriptions are unreadable: {e}"))
        })?;
        let legacy = record.subscriptions.is_none() || subs.legacy;
        if legacy {
            subs.floor = record.last_event_at.unwrap_or(i64::MIN);
        }
        Ok((subs, legacy))
    }

    /// As stored.
    fn parse(text: Option<&str>) -> Result<Self, serde_json::Error> {
        text.map_or_else(|| Ok(Self { floor: i64::MIN, ..Self::default() }), serde_json::from_str)
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Bounded: subscriptions that give nothing go first, then the oldest; the floor rises to
    /// the newest event forgotten, so a late event of a forgotten subscription is stale.
    fn prune(&mut self) {
        while self.subs.len() > Self::MAX {
            let victim =
                self.subs.iter().min_by_key(|(_, s)| (s.plan.is_some(), s.at, s.rank)).map(|(id, _)| id.clone());
            let Some(id) = victim else { break };
            if let Some(gone) = self.subs.remove(&id) {
                self.floor = self.floor.max(gone.at + 1);
            }
        }
    }

    /// The plan of the live subscriptions: the highest by `order`, among equals the one whose
    /// event came last.
    fn best(&self, order: &Order<'_>) -> Option<PlanId> {
        self.subs
            .values()
            .filter_map(|s| s.plan.as_ref().map(|p| (p, s.at, s.rank)))
            .min_by(|a, b| order.rank(a.0).cmp(&order.rank(b.0)).then((b.1, b.2).cmp(&(a.1, a.2))))
            .map(|(p, _, _)| PlanId::from(p.as_str()))
    }
}
