//! The directory role of the SqliteStore.

use super::*;
use crate::store::{ChangeCall, Changes, KeyWrite, TenantChange};

#[async_trait]
impl DirectoryStore for SqliteStore {
    async fn changes(&self, call: ChangeCall<'_>) -> Result<Changes, StoreError> {
        match call {
            ChangeCall::Tell { tenant, at } => {
                let tenant = tenant.clone();
                self.write(move |tx, _| {
                    let mut feed = read_changes(tx)?;
                    let floor = feed.floor;
                    let (stamp, dropped) = feed.tell(&tenant, at);
                    tx.prepare_cached(
                        "INSERT INTO tenant_change (tenant, at, stamp) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (tenant) DO UPDATE SET at = excluded.at, stamp = excluded.stamp",
                    )?
                    .execute(params![tenant.as_str(), at, stamp])?;
                    for gone in &dropped {
                        tx.prepare_cached("DELETE FROM tenant_change WHERE tenant = ?1")?.execute([gone.as_str()])?;
                    }
                    if feed.floor != floor {
                        tx.prepare_cached(
                            "INSERT INTO tenant_change (tenant, at, stamp) VALUES ('', 0, ?1) \
                             ON CONFLICT (tenant) DO UPDATE SET stamp = excluded.stamp",
                        )?
                        .execute([feed.floor])?;
                    }
                    Ok(Changes::default())
                })
                .await
            }
            ChangeCall::Read => self.read(read_changes).await,
        }
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| match &after {
            None => tx
                .prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t ORDER BY t.id LIMIT ?1"))?
                .query_map(params![limit], tenant_row)?
                .collect(),
            Some(a) => tx
                .prepare_cached(&format!(
                    "SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.id > ?1 ORDER BY t.id LIMIT ?2"
                ))?
                .query_map(params![a.as_str(), limit], tenant_row)?
                .collect(),
        })
        .await
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        let customer = customer.to_owned();
        self.read(move |tx| {
            tx.prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.customer = ?1"))?
                .query_row([&customer], tenant_row)
                .optional()
        })
        .await
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        let change = change.clone();
        self.write(move |tx, progress| {
            let seen: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM webhook_event WHERE id = ?1)")?
                .query_row([&change.event_id], |r| r.get(0))?;
            if seen {
                return Ok(PlanChangeOutcome::Duplicate);
            }
            let Some(mut record) = tx
                .prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.customer = ?1"))?
                .query_row([&change.customer], tenant_row)
                .optional()?
            else {
                return Ok(PlanChangeOutcome::UnknownCustomer);
            };
            if change.subscriptions.as_ref().is_some_and(|s| s.read != record.subscriptions || s.plan != record.plan) {
                return Ok(PlanChangeOutcome::Changed);
            }
            if progress.at_cap().1 {
                let freed = prune_ids(tx, "webhook_event", change.created)?;
                progress.freed(0, freed);
            }
            progress.add_webhook_id()?;
            tx.prepare_cached("INSERT INTO webhook_event (id, at) VALUES (?1, ?2)")?
                .execute(params![change.event_id, change.created])?;
            if let Some(subs) = &change.subscriptions {
                // Ordered by its subscription (the caller's), over what was read (above, in
                // this transaction).
                let last = record.last_event_at.map_or(change.created, |l| l.max(change.created));
                tx.prepare_cached("UPDATE tenant SET plan = ?2, last_event_at = ?3, subscriptions = ?4 WHERE id = ?1")?
                    .execute(params![record.id.as_str(), change.plan.as_str(), last, subs.written])?;
                record.plan = change.plan.clone();
                record.last_event_at = Some(last);
                record.subscriptions = Some(subs.written.clone());
                return Ok(PlanChangeOutcome::Applied(record));
            }
            if record.last_event_at.is_some_and(|last| last > change.created) {
                return Ok(PlanChangeOutcome::Stale);
            }
            tx.prepare_cached("UPDATE tenant SET plan = ?2, last_event_at = ?3 WHERE id = ?1")?.execute(params![
                record.id.as_str(),
                change.plan.as_str(),
                change.created
            ])?;
            record.plan = change.plan.clone();
            record.last_event_at = Some(change.created);
            Ok(PlanChangeOutcome::Applied(record))
        })
        .await
    }

    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        let key = *key;
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "SELECT {TENANT_COLUMNS} FROM api_key k JOIN tenant t ON t.id = k.tenant \
                 WHERE k.hash = ?1 AND (k.expires_at IS NULL OR k.expires_at > ?2)"
            ))?
            .query_row(params![&key.as_bytes()[..], unix_now()], tenant_row)
            .optional()
        })
        .await
    }

    async fn put_key(&self, key: &ApiKeyRecord, when: KeyWrite) -> Result<(), StoreError> {
        let key = key.clone();
        self.write(move |tx, _| {
            let sql = match when {
                KeyWrite::Upsert => {
                    "INSERT INTO api_key (hash, tenant, prefix, created_at, expires_at, scopes) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (hash) DO UPDATE SET prefix = excluded.prefix, expires_at = excluded.expires_at, \
                     scopes = excluded.scopes WHERE api_key.tenant = excluded.tenant"
                }
                // ?4 (its creation) is kept as stored.
                KeyWrite::Existing => {
                    "UPDATE api_key SET prefix = ?3, expires_at = ?5, scopes = ?6 WHERE hash = ?1 AND tenant = ?2"
                }
            };
            let changed = tx.prepare_cached(sql)?.execute(params![
                &key.hash.as_bytes()[..],
                key.tenant.as_str(),
                key.prefix,
                key.created_at,
                key.expires_at,
                key.scopes.bits()
            ])?;
            Ok(changed)
        })
        .await
        .and_then(|changed| match (changed, when) {
            (0, KeyWrite::Upsert) => Err(StoreError::Conflict("the API key, held by another tenant")),
            (0, KeyWrite::Existing) => Err(StoreError::Conflict("the API key, removed meanwhile")),
            _ => Ok(()),
        })
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let tenant = tenant.clone();
        self.read(move |tx| {
            let mut keys = tx
                .prepare_cached(
                    "SELECT hash, tenant, prefix, created_at, expires_at, scopes FROM api_key WHERE tenant = ?1",
                )?
                .query_map([tenant.as_str()], key_row)?
                .collect::<Sql<Vec<_>>>()?;
            keys.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(keys)
        })
        .await
    }

    async fn key(&self, key: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let key = *key;
        self.read(move |tx| {
            tx.prepare_cached(
                "SELECT hash, tenant, prefix, created_at, expires_at, scopes FROM api_key WHERE hash = ?1",
            )?
            .query_row([&key.as_bytes()[..]], key_row)
            .optional()
        })
        .await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let id = id.clone();
        self.read(move |tx| {
            tx.prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.id = ?1"))?
                .query_row([id.as_str()], tenant_row)
                .optional()
        })
        .await
    }

    async fn update_tenant(&self, update: &TenantUpdate, when: UpdateWhen<'_>) -> Result<bool, StoreError> {
        let update = update.clone();
        let read = match when {
            UpdateWhen::Unchanged(read) => Some(read.clone()),
            UpdateWhen::Always => None,
        };
        self.write(move |tx, _| {
            let id = update.tenant().as_str();
            let Some(stored) = tx
                .prepare_cached(&format!("SELECT {TENANT_COLUMNS} FROM tenant t WHERE t.id = ?1"))?
                .query_row([id], tenant_row)
                .optional()?
            else {
                return Ok(false);
            };
            if read.as_ref().is_some_and(|read| *read != stored) {
                return Ok(false);
            }
            match &update {
                TenantUpdate::Plan(_, plan) => {
                    tx.prepare_cached("UPDATE tenant SET plan = ?2 WHERE id = ?1")?
                        .execute(params![id, plan.as_str()])?;
                }
                TenantUpdate::Customer(_, customer) => {
                    if let Some(c) = customer {
                        // Given to this tenant, it leaves any other.
                        tx.prepare_cached("UPDATE tenant SET customer = NULL WHERE customer = ?1 AND id <> ?2")?
                            .execute(params![c, id])?;
                    }
                    // Another customer's subscriptions are not this one's.
                    tx.prepare_cached(
                        "UPDATE tenant SET customer = ?2, \
                         subscriptions = CASE WHEN customer IS ?2 THEN subscriptions ELSE NULL END WHERE id = ?1",
                    )?
                    .execute(params![id, customer])?;
                }
                TenantUpdate::MetronomeCustomer(_, customer) => {
                    tx.prepare_cached("UPDATE tenant SET metronome_customer = ?2 WHERE id = ?1")?
                        .execute(params![id, customer])?;
                }
                TenantUpdate::Overrides(_, overrides) => {
                    tx.prepare_cached("UPDATE tenant SET overrides = ?2 WHERE id = ?1")?
                        .execute(params![id, overrides])?;
                }
                TenantUpdate::AlertEndpoint(_, endpoint) => {
                    tx.prepare_cached("UPDATE tenant SET alert_endpoint = ?2 WHERE id = ?1")?
                        .execute(params![id, endpoint])?;
                }
            }
            Ok(true)
        })
        .await
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        let (record, keys) = (record.clone(), keys.to_vec());
        self.write(move |tx, _| {
            let id = record.id.as_str();
            if let Some(c) = &record.customer {
                // A billing customer belongs to one tenant: given to this one, it leaves any other.
                tx.prepare_cached("UPDATE tenant SET customer = NULL WHERE customer = ?1 AND id <> ?2")?
                    .execute(params![c, id])?;
            }
            tx.prepare_cached(
                "INSERT INTO tenant (id, plan, customer, last_event_at, overrides, subscriptions, metronome_customer, \
                 alert_endpoint) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, customer = excluded.customer, \
                 last_event_at = excluded.last_event_at, overrides = excluded.overrides, \
                 subscriptions = excluded.subscriptions, metronome_customer = excluded.metronome_customer, \
                 alert_endpoint = excluded.alert_endpoint",
            )?
            .execute(params![
                id,
                record.plan.as_str(),
                record.customer,
                record.last_event_at,
                record.overrides,
                record.subscriptions,
                record.metronome_customer,
                record.alert_endpoint
            ])?;
            for key in &keys {
                tx.prepare_cached(
                    "INSERT INTO api_key (hash, tenant, created_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (hash) DO UPDATE SET tenant = excluded.tenant, \
                     scopes = CASE WHEN api_key.tenant = excluded.tenant THEN api_key.scopes END",
                )?
                .execute(params![&key.as_bytes()[..], id, unix_now()])?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        let key = *key;
        self.write(move |tx, _| {
            tx.prepare_cached("DELETE FROM api_key WHERE hash = ?1")?.execute([&key.as_bytes()[..]])?;
            Ok(())
        })
        .await
    }
}

fn tenant_row(r: &Row<'_>) -> Sql<TenantRecord> {
    let id: String = r.get(0)?;
    let plan: String = r.get(1)?;
    let mut t = TenantRecord::new(id.into(), plan.into());
    t.customer = r.get(2)?;
    t.last_event_at = r.get(3)?;
    t.overrides = r.get(4)?;
    t.subscriptions = r.get(5)?;
    t.metronome_customer = r.get(6)?;
    t.alert_endpoint = r.get(7)?;
    Ok(t)
}

const TENANT_COLUMNS: &str =
    "t.id, t.plan, t.customer, t.last_event_at, t.overrides, t.subscriptions, t.metronome_customer, t.alert_endpoint";

/// A key's row: hash, tenant, prefix, created_at, expires_at, scopes.
fn key_row(r: &Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    let hash: Vec<u8> = r.get(0)?;
    let hash = KeyHash::from_bytes(&hash).ok_or(rusqlite::Error::InvalidColumnType(
        0,
        "hash".into(),
        rusqlite::types::Type::Blob,
    ))?;
    Ok(ApiKeyRecord::new(hash, r.get::<_, String>(1)?.into(), r.get(3)?)
        .with_prefix(r.get::<_, String>(2)?)
        .with_expiry(r.get(4)?)
        .with_scopes(r.get::<_, Option<i64>>(5)?.map_or(KeyScopes::DEFAULT, KeyScopes::from_bits)))
}

/// The feed of tenants changed as stored: its entries, and its floor (the stamp of the empty
/// tenant's row).
fn read_changes(tx: &Transaction<'_>) -> Sql<Changes> {
    let mut feed = Changes::default();
    let mut rows = tx.prepare_cached("SELECT tenant, at, stamp FROM tenant_change")?;
    let mut rows = rows.query([])?;
    while let Some(row) = rows.next()? {
        let tenant: String = row.get(0)?;
        if tenant.is_empty() {
            feed.floor = row.get(2)?;
        } else {
            feed.tenants.push(TenantChange::new(TenantId::new(tenant), row.get(1)?, row.get(2)?));
        }
    }
    Ok(feed)
}
