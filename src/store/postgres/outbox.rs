//! The alerts role of the PostgresStore: the outbox; a claim takes due rows under row locks,
//! skipping those another claim holds (`FOR UPDATE SKIP LOCKED`).

use super::*;
use crate::store::{AlertClaim, AlertKey, AlertOutcome, AlertQuery, AlertState, OutboxEntry, OutboxStore};

const COLUMNS: &str = "id, destination, tenant, event, body, created_at, keep_until, state, attempts, next_at, \
                       claim_owner, claim_until, last_error, delivered_at";

/// A row as read (columns in [`COLUMNS`]' order).
fn entry(r: &tokio_postgres::Row) -> OutboxEntry {
    let mut e = OutboxEntry::new(
        AlertKey::new(r.get::<_, String>(0), r.get::<_, String>(1)),
        TenantId::from(r.get::<_, String>(2)),
        r.get::<_, String>(3),
        r.get::<_, String>(4),
        r.get(5),
        r.get(6),
    );
    e.state = AlertState::parse(r.get::<_, &str>(7)).unwrap_or(AlertState::Dead);
    e.attempts = u32::try_from(r.get::<_, i64>(8)).unwrap_or(u32::MAX);
    e.next_at = r.get(9);
    e.claim = (r.get::<_, i64>(10) as u64, r.get(11));
    e.last_error = r.get(12);
    e.delivered_at = r.get(13);
    e
}

impl PostgresStore {
    /// Applies `change` to the row of `key` (locked) and writes it back when it says so.
    async fn change_alert(
        &self,
        key: &AlertKey,
        change: impl Fn(&mut OutboxEntry) -> bool,
    ) -> Result<bool, StoreError> {
        let read = self
            .sql(&format!("SELECT {COLUMNS} FROM {{s}}.alert_outbox WHERE id = $1 AND destination = $2 FOR UPDATE"));
        let write = self.sql(
            "UPDATE {s}.alert_outbox SET state = $3, attempts = $4, next_at = $5, claim_owner = $6, \
             claim_until = $7, last_error = $8, delivered_at = $9, created_at = $10, keep_until = $11 \
             WHERE id = $1 AND destination = $2",
        );
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let Some(found) = tx.query_typed_opt(&read, args![key.id.as_str(), key.destination.as_str()]).await? else {
                return Ok(false);
            };
            let mut e = entry(&found);
            if !change(&mut e) {
                return Ok(false);
            }
            tx.query_typed(
                &write,
                args![
                    key.id.as_str(),
                    key.destination.as_str(),
                    e.state.as_str(),
                    i64::from(e.attempts),
                    e.next_at,
                    node_int(e.claim.0),
                    e.claim.1,
                    e.last_error.clone(),
                    e.delivered_at,
                    e.created_at,
                    e.keep_until
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }
}

#[async_trait]
impl OutboxStore for PostgresStore {
    async fn put_alerts(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError> {
        let sql = self.sql(&format!(
            "INSERT INTO {{s}}.alert_outbox ({COLUMNS}) \
             SELECT u.*, NULL::text, NULL::int8 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
             $5::text[], $6::int8[], $7::int8[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::int8[]) AS u \
             ON CONFLICT (id, destination) DO NOTHING"
        ));
        let ids: Vec<String> = entries.iter().map(|e| e.key.id.clone()).collect();
        let destinations: Vec<String> = entries.iter().map(|e| e.key.destination.clone()).collect();
        let tenants: Vec<String> = entries.iter().map(|e| e.tenant.as_str().to_owned()).collect();
        let events: Vec<String> = entries.iter().map(|e| e.event.clone()).collect();
        let bodies: Vec<String> = entries.iter().map(|e| e.body.clone()).collect();
        let created: Vec<i64> = entries.iter().map(|e| e.created_at).collect();
        let kept: Vec<i64> = entries.iter().map(|e| e.keep_until).collect();
        let states: Vec<String> = entries.iter().map(|e| e.state.as_str().to_owned()).collect();
        let attempts: Vec<i64> = entries.iter().map(|e| i64::from(e.attempts)).collect();
        let next: Vec<i64> = entries.iter().map(|e| e.next_at).collect();
        let owners: Vec<i64> = entries.iter().map(|e| node_int(e.claim.0)).collect();
        let until: Vec<i64> = entries.iter().map(|e| e.claim.1).collect();
        self.retrying(|| async {
            let client = self.client().await?;
            let written = client
                .execute_typed(
                    &sql,
                    args![
                        ids.clone(),
                        destinations.clone(),
                        tenants.clone(),
                        events.clone(),
                        bodies.clone(),
                        created.clone(),
                        kept.clone(),
                        states.clone(),
                        attempts.clone(),
                        next.clone(),
                        owners.clone(),
                        until.clone()
                    ],
                )
                .await?;
            Ok(usize::try_from(written).unwrap_or(usize::MAX))
        })
        .await
    }

    async fn claim_alerts(&self, claim: &AlertClaim) -> Result<Vec<OutboxEntry>, StoreError> {
        let sql = self.sql(&format!(
            "UPDATE {{s}}.alert_outbox o SET claim_owner = $3, claim_until = $4 FROM ( \
                 SELECT id, destination FROM {{s}}.alert_outbox \
                 WHERE state = 'pending' AND next_at <= $1 AND claim_until <= $1 \
                 ORDER BY next_at, id, destination LIMIT $2 FOR UPDATE SKIP LOCKED) due \
             WHERE o.id = due.id AND o.destination = due.destination RETURNING {}",
            COLUMNS.split(", ").map(|c| format!("o.{c}")).collect::<Vec<_>>().join(", ")
        ));
        let limit = i64::try_from(claim.limit).unwrap_or(i64::MAX);
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = client.query_typed(&sql, args![claim.now, limit, node_int(claim.owner), claim.until]).await?;
            let mut claimed: Vec<OutboxEntry> = rows.iter().map(entry).collect();
            claimed.sort_by(|a, b| (a.next_at, &a.key).cmp(&(b.next_at, &b.key)));
            Ok(claimed)
        })
        .await
    }

    async fn settle_alert(&self, key: &AlertKey, owner: u64, outcome: &AlertOutcome) -> Result<bool, StoreError> {
        self.change_alert(key, |e| e.settle(owner, outcome)).await
    }

    async fn list_alerts(&self, query: &AlertQuery) -> Result<Vec<OutboxEntry>, StoreError> {
        let sql = self.sql(&format!(
            "SELECT {COLUMNS} FROM {{s}}.alert_outbox WHERE (id, destination) > ($1, $2) \
             AND ($3::text IS NULL OR state = $3) AND ($4::text IS NULL OR id = $4) \
             ORDER BY id, destination LIMIT $5"
        ));
        let (id, destination) =
            query.after.as_ref().map_or((String::new(), String::new()), |k| (k.id.clone(), k.destination.clone()));
        let state = query.state.map(|s| s.as_str().to_owned());
        let limit = i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX);
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = client
                .query_typed(&sql, args![id.clone(), destination.clone(), state.clone(), query.id.clone(), limit])
                .await?;
            Ok(rows.iter().map(entry).collect())
        })
        .await
    }

    async fn requeue_alert(&self, key: &AlertKey, now: i64) -> Result<bool, StoreError> {
        self.change_alert(key, |e| e.requeue(now)).await
    }

    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError> {
        let sql = self.sql("DELETE FROM {s}.alert_outbox WHERE state <> 'pending' AND keep_until < $1");
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(client.execute_typed(&sql, args![now]).await?)
        })
        .await
    }
}
