//! The audit role of the PostgresStore: each tenant's records numbered by its `audit_head`
//! row (an upsert, under the row's lock: two appends for a tenant take turns), an append one
//! transaction (the number, the record, the oldest past the bound dropped).

use super::*;
use crate::store::{Actor, AuditQuery, AuditRecord, AuditStore, Setting, AUDIT_PER_TENANT};

const COLUMNS: &str = "tenant, seq, at, actor, setting, before, after";

/// A row as read (columns in [`COLUMNS`]' order); an actor this build does not know is read
/// as [`Actor::Other`].
fn record(r: &tokio_postgres::Row) -> AuditRecord {
    let actor: String = r.get(3);
    let mut rec = AuditRecord::new(
        TenantId::from(r.get::<_, String>(0)),
        r.get(2),
        Actor::parse(&actor).unwrap_or(Actor::Other(actor)),
        Setting::parse(r.get::<_, &str>(4)),
        r.get(5),
        r.get(6),
    );
    rec.seq = r.get(1);
    rec
}

#[async_trait]
impl AuditStore for PostgresStore {
    async fn append_audit(&self, record: &AuditRecord) -> Result<i64, StoreError> {
        let head = self.sql(
            "INSERT INTO {s}.audit_head (tenant, seq) VALUES ($1, 1) \
             ON CONFLICT (tenant) DO UPDATE SET seq = {s}.audit_head.seq + 1 RETURNING seq",
        );
        let put =
            self.sql(&format!("INSERT INTO {{s}}.audit_log ({COLUMNS}, own) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"));
        // The tenant's records of this kind past the newest AUDIT_PER_TENANT.
        let drop = self.sql(
            "DELETE FROM {s}.audit_log WHERE tenant = $1 AND own = $2 AND seq <= (SELECT seq FROM {s}.audit_log \
             WHERE tenant = $1 AND own = $2 ORDER BY seq DESC LIMIT 1 OFFSET $3)",
        );
        let own = record.actor.is_tenant();
        let tenant = record.tenant.to_string();
        let actor = record.actor.to_stored();
        let setting = record.setting.as_str().to_owned();
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let seq: i64 = tx.query_typed(&head, args![tenant.clone()]).await?[0].get(0);
            tx.query_typed(
                &put,
                args![
                    tenant.clone(),
                    seq,
                    record.at,
                    actor.clone(),
                    setting.clone(),
                    record.before.clone(),
                    record.after.clone(),
                    own
                ],
            )
            .await?;
            tx.query_typed(&drop, args![tenant.clone(), own, AUDIT_PER_TENANT]).await?;
            tx.commit().await?;
            Ok(seq)
        })
        .await
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX);
        let rows = match &query.tenant {
            Some(t) => {
                let sql = self.sql(&format!(
                    "SELECT {COLUMNS} FROM {{s}}.audit_log WHERE tenant = $1 AND seq < $2 AND at >= $3 \
                     ORDER BY seq DESC LIMIT $4"
                ));
                let before = query.before.as_ref().map_or(i64::MAX, |c| c.seq);
                self.retrying(|| async {
                    let client = self.client().await?;
                    Ok(client.query_typed(&sql, args![t.to_string(), before, query.since, limit]).await?)
                })
                .await?
            }
            None => {
                let sql = self.sql(&format!(
                    "SELECT {COLUMNS} FROM {{s}}.audit_log WHERE (at, tenant, seq) < ($1, $2, $3) AND at >= $4 \
                     AND at <= $6 ORDER BY at DESC, tenant DESC, seq DESC LIMIT $5"
                ));
                let (at, tenant, seq) =
                    query.before.as_ref().map_or((i64::MAX, String::new(), 0), |c| (c.at, c.tenant.to_string(), c.seq));
                self.retrying(|| async {
                    let client = self.client().await?;
                    Ok(client.query_typed(&sql, args![at, tenant.clone(), seq, query.since, limit, query.now]).await?)
                })
                .await?
            }
        };
        Ok(query.finish(rows.iter().map(record).collect()))
    }

    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        let sql = self.sql("DELETE FROM {s}.audit_log WHERE at < $1");
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(client.execute_typed(&sql, args![before]).await?)
        })
        .await
    }
}
