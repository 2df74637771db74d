//! What an event says (read typed, else from its JSON) and the plan it moves its customer to.

use stripe_webhook::EventObject;

use crate::config::{PlanId, StripeSettings};

/// The fields of an event a transition needs.
#[derive(Debug, Default)]
pub(super) struct Fields {
    pub(super) id: String,
    pub(super) kind: String,
    pub(super) created: i64,
    pub(super) customer: Option<String>,
    /// The subscription's status, when the object is a subscription.
    pub(super) status: Option<String>,
    /// The subscription's prices: ids and lookup keys.
    pub(super) prices: Vec<String>,
    /// The subscription's id, when the object is a subscription.
    pub(super) subscription: Option<String>,
}

/// The plan an event moves its customer to: `Ok(None)` when none is configured, `Err(())`
/// for an active subscription whose prices are not mapped.
pub(super) fn transition(settings: &StripeSettings, f: &Fields) -> Result<Option<PlanId>, ()> {
    if let Some(plan) = settings.events.get(&f.kind) {
        return Ok(Some(plan.clone()));
    }
    let Some(status) = &f.status else { return Ok(None) };
    match settings.subscription_status.get(status) {
        Some(crate::config::StatusOutcome::Plan(plan)) => return Ok(Some(plan.clone())),
        Some(_) => return Ok(None),
        None => {}
    }
    if status == "active" || status == "trialing" {
        return f.prices.iter().find_map(|p| settings.prices.get(p)).cloned().map(Some).ok_or(());
    }
    Ok(None)
}

pub(super) fn typed_fields(event: &stripe_webhook::Event) -> Option<Fields> {
    let mut f = Fields {
        id: event.id.as_str().to_owned(),
        kind: event.type_.as_str().to_owned(),
        created: event.created,
        ..Fields::default()
    };
    match &event.data.object {
        EventObject::CustomerSubscriptionCreated(s)
        | EventObject::CustomerSubscriptionUpdated(s)
        | EventObject::CustomerSubscriptionDeleted(s)
        | EventObject::CustomerSubscriptionPaused(s)
        | EventObject::CustomerSubscriptionResumed(s) => {
            f.customer = Some(s.customer.id().as_str().to_owned());
            f.subscription = Some(s.id.as_str().to_owned());
            f.status = Some(s.status.as_str().to_owned());
            for item in &s.items.data {
                f.prices.push(item.price.id.as_str().to_owned());
                f.prices.extend(item.price.lookup_key.clone());
            }
        }
        EventObject::PaymentMethodAttached(pm) => {
            f.customer = pm.customer.as_ref().map(|c| c.id().as_str().to_owned());
        }
        // Any other type: the few fields are read from the JSON.
        _ => return None,
    }
    Some(f)
}

/// The fields from the raw JSON: `data.object.customer` (a string or an expanded object), or
/// the object's own id when it is a customer; a subscription's status and prices.
pub(super) fn json_fields(payload: &str) -> Option<Fields> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let object = &v["data"]["object"];
    let id_of = |c: &serde_json::Value| c.as_str().or_else(|| c["id"].as_str()).map(str::to_owned);
    let customer = match object["object"].as_str() {
        Some("customer") => id_of(&object["id"]),
        _ => id_of(&object["customer"]),
    };
    let is_subscription = object["object"].as_str() == Some("subscription");
    let mut prices = Vec::new();
    if is_subscription {
        for item in object["items"]["data"].as_array().into_iter().flatten() {
            prices.extend(item["price"]["id"].as_str().map(str::to_owned));
            prices.extend(item["price"]["lookup_key"].as_str().map(str::to_owned));
        }
    }
    Some(Fields {
        id: v["id"].as_str()?.to_owned(),
        kind: v["type"].as_str()?.to_owned(),
        created: v["created"].as_i64()?,
        customer,
        status: if is_subscription { object["status"].as_str().map(str::to_owned) } else { None },
        prices,
        subscription: if is_subscription { object["id"].as_str().map(str::to_owned) } else { None },
    })
}

/// The plan a customer is moved to when its last subscription giving a plan ends: the one
/// `customer.subscription.deleted` maps to, else the `canceled` status's.
pub(super) fn canceled_plan(settings: &StripeSettings) -> Option<PlanId> {
    settings.events.get("customer.subscription.deleted").cloned().or_else(|| {
        match settings.subscription_status.get("canceled") {
            Some(crate::config::StatusOutcome::Plan(plan)) => Some(plan.clone()),
            _ => None,
        }
    })
}
