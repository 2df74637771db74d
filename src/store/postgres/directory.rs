//! The directory role of the PostgresStore: a plan change is applied with its event id in one
//! transaction.

use super::*;
use crate::store::{ChangeCall, Changes, KeyWrite, TenantChange};

const TENANT_COLUMNS: &str =
    "t.id, t.plan, t.customer, t.last_event_at, t.overrides, t.subscriptions, t.metronome_customer, t.alert_endpoint";

const KEY_COLUMNS: &str = "hash, tenant, prefix, created_at, expires_at, scopes";

/// A key's row of [`KEY_COLUMNS`].
fn key_row(r: &Row) -> Result<ApiKeyRecord, StoreError> {
    let hash: Vec<u8> = r.get(0);
    let hash = KeyHash::from_bytes(&hash)
        .ok_or_else(|| StoreError::Unusable("an API key hash of the wrong length".to_owned()))?;
    Ok(ApiKeyRecord::new(hash, r.get::<_, String>(1).into(), r.get(3))
        .with_prefix(r.get::<_, String>(2))
        .with_expiry(r.get(4))
        .with_scopes(r.get::<_, Option<i64>>(5).map_or(KeyScopes::DEFAULT, KeyScopes::from_bits)))
}

fn tenant_row(r: &Row) -> TenantRecord {
    let mut t = TenantRecord::new(r.get::<_, String>(0).into(), r.get::<_, String>(1).into());
    t.customer = r.get(2);
    t.last_event_at = r.get(3);
    t.overrides = r.get(4);
    t.subscriptions = r.get(5);
    t.metronome_customer = r.get(6);
    t.alert_endpoint = r.get(7);
    t
}

#[async_trait]
impl DirectoryStore for PostgresStore {
    async fn changes(&self, call: ChangeCall<'_>) -> Result<Changes, StoreError> {
        let all = self.sql("SELECT tenant, at, stamp FROM {s}.tenant_change");
        let read = |rows: &[Row]| {
            let mut feed = Changes::default();
            for row in rows {
                let tenant: String = row.get(0);
                if tenant.is_empty() {
                    feed.floor = row.get(2);
                } else {
                    feed.tenants.push(TenantChange::new(TenantId::new(tenant), row.get(1), row.get(2)));
                }
            }
            feed
        };
        let ChangeCall::Tell { tenant, at } = call else {
            return self
                .retrying(|| async {
                    let client = self.client().await?;
                    Ok(read(&client.query_typed(&all, &[]).await?))
                })
                .await;
        };
        // The floor's row locked first: tells apply one at a time, each on the feed as the
        // last left it.
        // Made again if it is missing (deleted by hand): without it, the lock would take nothing.
        let ensure =
            self.sql("INSERT INTO {s}.tenant_change (tenant, at, stamp) VALUES ('', 0, 0) ON CONFLICT DO NOTHING");
        let lock = self.sql("SELECT at FROM {s}.tenant_change WHERE tenant = '' FOR UPDATE");
        let upsert = self.sql(
            "INSERT INTO {s}.tenant_change (tenant, at, stamp) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant) DO UPDATE SET at = excluded.at, stamp = excluded.stamp",
        );
        let delete = self.sql("DELETE FROM {s}.tenant_change WHERE tenant = $1");
        let floor = self.sql("UPDATE {s}.tenant_change SET stamp = $1 WHERE tenant = ''");
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            tx.query_typed(&ensure, &[]).await?;
            tx.query_typed(&lock, &[]).await?;
            let mut feed = read(&tx.query_typed(&all, &[]).await?);
            let before = feed.floor;
            let (stamp, dropped) = feed.tell(tenant, at);
            tx.query_typed(&upsert, args![tenant.as_str(), at, stamp]).await?;
            for gone in &dropped {
                tx.query_typed(&delete, args![gone.as_str()]).await?;
            }
            if feed.floor != before {
                tx.query_typed(&floor, args![feed.floor]).await?;
            }
            tx.commit().await?;
            Ok(Changes::default())
        })
        .await
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        let limit = int(limit as u64);
        let first = self.sql(&format!("SELECT {TENANT_COLUMNS} FROM {{s}}.tenant t ORDER BY t.id LIMIT $1"));
        let next =
            self.sql(&format!("SELECT {TENANT_COLUMNS} FROM {{s}}.tenant t WHERE t.id > $1 ORDER BY t.id LIMIT $2"));
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = match after {
                None => client.query_typed(&first, args![limit]).await?,
                Some(a) => client.query_typed(&next, args![a.as_str(), limit]).await?,
            };
            Ok(rows.iter().map(tenant_row).collect())
        })
        .await
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        let sql = self.sql(&format!("SELECT {TENANT_COLUMNS} FROM {{s}}.tenant t WHERE t.customer = $1"));
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(client.query_typed_opt(&sql, args![customer]).await?.as_ref().map(tenant_row))
        })
        .await
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        // The event id first: a redelivery handled at once on another node waits here for this
        // transaction, then finds the id taken (a duplicate), as one node would see it. An
        // outcome that applies nothing (no such customer, subscriptions changed) rolls the id
        // back, so a later delivery is handled anew.
        let mark = self
            .sql("INSERT INTO {s}.webhook_event (id, seen_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING RETURNING 1");
        let read = self.sql(&format!("SELECT {TENANT_COLUMNS} FROM {{s}}.tenant t WHERE t.customer = $1 FOR UPDATE"));
        let with_subs =
            self.sql("UPDATE {s}.tenant SET plan = $2, last_event_at = $3, subscriptions = $4 WHERE id = $1");
        let plain = self.sql("UPDATE {s}.tenant SET plan = $2, last_event_at = $3 WHERE id = $1");
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            if tx.query_typed(&mark, args![change.event_id.as_str(), change.created]).await?.is_empty() {
                return Ok(PlanChangeOutcome::Duplicate);
            }
            let Some(mut record) =
                tx.query_typed_opt(&read, args![change.customer.as_str()]).await?.as_ref().map(tenant_row)
            else {
                return Ok(PlanChangeOutcome::UnknownCustomer);
            };
            if change.subscriptions.as_ref().is_some_and(|s| s.read != record.subscriptions || s.plan != record.plan) {
                return Ok(PlanChangeOutcome::Changed);
            }
            count_ids(self, &tx, "webhook_event", 1, change.created).await?;
            // Older than the last event applied (ordered by creation): seen, not applied.
            if change.subscriptions.is_none() && record.last_event_at.is_some_and(|last| last > change.created) {
                tx.commit().await?;
                return Ok(PlanChangeOutcome::Stale);
            }
            let (id, plan) = (record.id.as_str().to_owned(), change.plan.as_str());
            if let Some(subs) = &change.subscriptions {
                // Ordered by its subscription (the caller's), over what was read (above, with
                // the row locked).
                let last = record.last_event_at.map_or(change.created, |l| l.max(change.created));
                tx.query_typed(&with_subs, args![id.as_str(), plan, last, subs.written.as_str()]).await?;
                record.last_event_at = Some(last);
                record.subscriptions = Some(subs.written.clone());
            } else {
                tx.query_typed(&plain, args![id.as_str(), plan, change.created]).await?;
                record.last_event_at = Some(change.created);
            }
            tx.commit().await?;
            record.plan = change.plan.clone();
            Ok(PlanChangeOutcome::Applied(record))
        })
        .await
    }

    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        let sql = self.sql(&format!(
            "SELECT {TENANT_COLUMNS} FROM {{s}}.api_key k JOIN {{s}}.tenant t ON t.id = k.tenant \
             WHERE k.hash = $1 AND (k.expires_at IS NULL OR k.expires_at > $2)"
        ));
        let hash = &key.as_bytes()[..];
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(client.query_typed_opt(&sql, args![hash, unix_now()]).await?.as_ref().map(tenant_row))
        })
        .await
    }

    async fn put_key(&self, key: &ApiKeyRecord, when: KeyWrite) -> Result<(), StoreError> {
        let sql = self.sql(match when {
            KeyWrite::Upsert => {
                "INSERT INTO {s}.api_key AS a (hash, tenant, prefix, created_at, expires_at, scopes) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (hash) DO UPDATE SET prefix = excluded.prefix, expires_at = excluded.expires_at, \
                 scopes = excluded.scopes WHERE a.tenant = excluded.tenant RETURNING 1"
            }
            // $4 (its creation) is kept as stored.
            KeyWrite::Existing => {
                "UPDATE {s}.api_key SET prefix = $3, expires_at = $5, scopes = $6 \
                 WHERE hash = $1 AND tenant = $2 AND $4::bigint IS NOT NULL RETURNING 1"
            }
        });
        let hash = &key.hash.as_bytes()[..];
        let changed = self
            .retrying(|| async {
                let client = self.client().await?;
                let rows = client
                    .query_typed(
                        &sql,
                        args![
                            hash,
                            key.tenant.as_str(),
                            key.prefix.as_str(),
                            key.created_at,
                            key.expires_at,
                            i64::from(key.scopes.bits())
                        ],
                    )
                    .await?;
                Ok(rows.len())
            })
            .await?;
        match (changed, when) {
            (0, KeyWrite::Upsert) => Err(StoreError::Conflict("the API key, held by another tenant")),
            (0, KeyWrite::Existing) => Err(StoreError::Conflict("the API key, removed meanwhile")),
            _ => Ok(()),
        }
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let sql = self.sql(&format!("SELECT {KEY_COLUMNS} FROM {{s}}.api_key WHERE tenant = $1"));
        let mut keys = self
            .retrying(|| async {
                let client = self.client().await?;
                Ok(client.query_typed(&sql, args![tenant.as_str()]).await?)
            })
            .await?
            .iter()
            .map(key_row)
            .collect::<Result<Vec<_>, StoreError>>()?;
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    async fn key(&self, key: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let sql = self.sql(&format!("SELECT {KEY_COLUMNS} FROM {{s}}.api_key WHERE hash = $1"));
        let hash = &key.as_bytes()[..];
        let row = self
            .retrying(|| async {
                let client = self.client().await?;
                Ok(client.query_typed_opt(&sql, args![hash]).await?)
            })
            .await?;
        row.as_ref().map(key_row).transpose()
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let sql = self.sql(&format!("SELECT {TENANT_COLUMNS} FROM {{s}}.tenant t WHERE t.id = $1"));
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(client.query_typed_opt(&sql, args![id.as_str()]).await?.as_ref().map(tenant_row))
        })
        .await
    }

    async fn update_tenant(&self, update: &TenantUpdate, when: UpdateWhen<'_>) -> Result<bool, StoreError> {
        let lock = self.sql(&format!("SELECT {TENANT_COLUMNS} FROM {{s}}.tenant t WHERE t.id = $1 FOR UPDATE"));
        let write = match update {
            TenantUpdate::Plan(..) => self.sql("UPDATE {s}.tenant SET plan = $2 WHERE id = $1"),
            // Another customer's subscriptions are not this one's.
            TenantUpdate::Customer(..) => self.sql(
                "UPDATE {s}.tenant SET customer = $2, \
                 subscriptions = CASE WHEN customer IS NOT DISTINCT FROM $2 THEN subscriptions ELSE NULL END \
                 WHERE id = $1",
            ),
            TenantUpdate::MetronomeCustomer(..) => {
                self.sql("UPDATE {s}.tenant SET metronome_customer = $2 WHERE id = $1")
            }
            TenantUpdate::Overrides(..) => self.sql("UPDATE {s}.tenant SET overrides = $2 WHERE id = $1"),
            TenantUpdate::AlertEndpoint(..) => self.sql("UPDATE {s}.tenant SET alert_endpoint = $2 WHERE id = $1"),
        };
        let release = self.sql("UPDATE {s}.tenant SET customer = NULL WHERE customer = $1 AND id <> $2");
        let id = update.tenant().as_str();
        let value: Option<&str> = match update {
            TenantUpdate::Plan(_, plan) => Some(plan.as_str()),
            TenantUpdate::Customer(_, v)
            | TenantUpdate::MetronomeCustomer(_, v)
            | TenantUpdate::Overrides(_, v)
            | TenantUpdate::AlertEndpoint(_, v) => v.as_deref(),
        };
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let Some(stored) = tx.query_typed_opt(&lock, args![id]).await?.as_ref().map(tenant_row) else {
                return Ok(false);
            };
            if let UpdateWhen::Unchanged(read) = when {
                if *read != stored {
                    return Ok(false);
                }
            }
            if let (TenantUpdate::Customer(..), Some(c)) = (update, value) {
                // Given to this tenant, it leaves any other.
                tx.query_typed(&release, args![c, id]).await?;
            }
            tx.query_typed(&write, args![id, value]).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        let release = self.sql("UPDATE {s}.tenant SET customer = NULL WHERE customer = $1 AND id <> $2");
        let upsert = self.sql(
            "INSERT INTO {s}.tenant (id, plan, customer, last_event_at, overrides, subscriptions, metronome_customer, \
             alert_endpoint) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, customer = excluded.customer, \
             last_event_at = excluded.last_event_at, overrides = excluded.overrides, \
             subscriptions = excluded.subscriptions, metronome_customer = excluded.metronome_customer, \
             alert_endpoint = excluded.alert_endpoint",
        );
        let key = self.sql(
            "INSERT INTO {s}.api_key AS a (hash, tenant, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (hash) DO UPDATE SET tenant = excluded.tenant, \
             scopes = CASE WHEN a.tenant = excluded.tenant THEN a.scopes END",
        );
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let id = record.id.as_str();
            if let Some(c) = &record.customer {
                // A billing customer belongs to one tenant: given to this one, it leaves any other.
                tx.query_typed(&release, args![c.as_str(), id]).await?;
            }
            tx.query_typed(
                &upsert,
                args![
                    id,
                    record.plan.as_str(),
                    record.customer.as_deref(),
                    record.last_event_at,
                    record.overrides.as_deref(),
                    record.subscriptions.as_deref(),
                    record.metronome_customer.as_deref(),
                    record.alert_endpoint.as_deref()
                ],
            )
            .await?;
            for k in keys {
                tx.query_typed(&key, args![&k.as_bytes()[..], id, unix_now()]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        let sql = self.sql("DELETE FROM {s}.api_key WHERE hash = $1");
        let hash = &key.as_bytes()[..];
        self.retrying(|| async {
            let client = self.client().await?;
            client.query_typed(&sql, args![hash]).await?;
            Ok(())
        })
        .await
    }
}
