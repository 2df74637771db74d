//! The directory role of the MemoryStore.

use super::*;
use crate::store::{ChangeCall, Changes, KeyWrite};

#[async_trait]
impl DirectoryStore for MemoryStore {
    async fn changes(&self, call: ChangeCall<'_>) -> Result<Changes, StoreError> {
        let mut inner = self.lock();
        match call {
            ChangeCall::Tell { tenant, at } => {
                inner.changes.tell(tenant, at);
                Ok(Changes::default())
            }
            ChangeCall::Read => Ok(inner.changes.clone()),
        }
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let from: Bound<&TenantId> = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner.tenants.range::<TenantId, _>((from, Bound::Unbounded)).take(limit).map(|(_, r)| r.clone()).collect())
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner.customers.get(customer).and_then(|t| inner.tenants.get(t)).cloned())
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        let mut inner = self.lock();
        if inner.webhooks.contains(&change.event_id) {
            return Ok(PlanChangeOutcome::Duplicate);
        }
        let Some(id) = inner.customers.get(&change.customer).cloned() else {
            return Ok(PlanChangeOutcome::UnknownCustomer);
        };
        if let Some(subs) = &change.subscriptions {
            // Ordered by its subscription (the caller's), applied over what was read.
            if inner.tenants.get(&id).is_none_or(|r| r.subscriptions != subs.read || r.plan != subs.plan) {
                return Ok(if inner.tenants.contains_key(&id) {
                    PlanChangeOutcome::Changed
                } else {
                    PlanChangeOutcome::UnknownCustomer
                });
            }
        }
        if !inner.webhooks.has_room(change.created) {
            return Err(StoreError::Full("webhook event ids"));
        }
        inner.webhooks.insert(&change.event_id, change.created);
        let Some(record) = inner.tenants.get_mut(&id) else {
            return Ok(PlanChangeOutcome::UnknownCustomer);
        };
        if let Some(subs) = &change.subscriptions {
            record.plan = change.plan.clone();
            record.subscriptions = Some(subs.written.clone());
            record.last_event_at = Some(record.last_event_at.map_or(change.created, |l| l.max(change.created)));
            return Ok(PlanChangeOutcome::Applied(record.clone()));
        }
        if record.last_event_at.is_some_and(|last| last > change.created) {
            return Ok(PlanChangeOutcome::Stale);
        }
        record.plan = change.plan.clone();
        record.last_event_at = Some(change.created);
        Ok(PlanChangeOutcome::Applied(record.clone()))
    }

    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        let inner = self.lock();
        let now = crate::store::unix_now();
        Ok(inner.keys.get(key).filter(|k| k.is_live(now)).and_then(|k| inner.tenants.get(&k.tenant)).cloned())
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        Ok(self.lock().tenants.get(id).cloned())
    }

    async fn update_tenant(&self, update: &TenantUpdate, when: UpdateWhen<'_>) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let tenant = update.tenant();
        let Some(t) = inner.tenants.get_mut(tenant) else { return Ok(false) };
        if let UpdateWhen::Unchanged(read) = when {
            if read != t {
                return Ok(false);
            }
        }
        match update {
            TenantUpdate::Plan(_, plan) => t.plan = plan.clone(),
            TenantUpdate::MetronomeCustomer(_, v) => t.metronome_customer.clone_from(v),
            TenantUpdate::Overrides(_, v) => t.overrides.clone_from(v),
            TenantUpdate::AlertEndpoint(_, v) => t.alert_endpoint.clone_from(v),
            TenantUpdate::Customer(_, customer) => {
                if t.customer != *customer {
                    // Another customer's subscriptions are not this one's.
                    t.subscriptions = None;
                }
                let old = std::mem::replace(&mut t.customer, customer.clone());
                if let Some(old) = old {
                    if inner.customers.get(&old) == Some(tenant) {
                        inner.customers.remove(&old);
                    }
                }
                if let Some(c) = customer {
                    // Given to this tenant, it leaves any other.
                    if let Some(other) = inner.customers.insert(c.clone(), tenant.clone()).filter(|o| o != tenant) {
                        if let Some(o) = inner.tenants.get_mut(&other) {
                            o.customer = None;
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(old) = inner.tenants.insert(record.id.clone(), record.clone()) {
            // The tenant's old customer leaves it (unless another tenant has it since).
            if let Some(c) = old.customer {
                if inner.customers.get(&c) == Some(&record.id) {
                    inner.customers.remove(&c);
                }
            }
        }
        if let Some(c) = &record.customer {
            // A billing customer belongs to one tenant: given to this one, it leaves any other.
            if let Some(other) = inner.customers.insert(c.clone(), record.id.clone()) {
                if other != record.id {
                    if let Some(t) = inner.tenants.get_mut(&other) {
                        t.customer = None;
                    }
                }
            }
        }
        let now = crate::store::unix_now();
        for key in keys {
            inner
                .keys
                .entry(*key)
                .and_modify(|k| {
                    // Another tenant's grants are not this one's.
                    if k.tenant != record.id {
                        k.scopes = crate::base::KeyScopes::DEFAULT;
                    }
                    k.tenant = record.id.clone();
                })
                .or_insert_with(|| ApiKeyRecord::new(*key, record.id.clone(), now));
        }
        Ok(())
    }

    async fn put_key(&self, key: &ApiKeyRecord, when: KeyWrite) -> Result<(), StoreError> {
        let mut inner = self.lock();
        match inner.keys.get(&key.hash) {
            Some(k) if k.tenant != key.tenant => {
                return Err(StoreError::Conflict("the API key, held by another tenant"))
            }
            None if when == KeyWrite::Existing => return Err(StoreError::Conflict("the API key, removed meanwhile")),
            _ => {}
        }
        inner.keys.insert(key.hash, key.clone());
        Ok(())
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut keys: Vec<_> = self.lock().keys.values().filter(|k| &k.tenant == tenant).cloned().collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    async fn key(&self, key: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(self.lock().keys.get(key).cloned())
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        self.lock().keys.remove(key);
        Ok(())
    }
}
