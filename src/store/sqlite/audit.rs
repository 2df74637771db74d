//! The audit role of the SqliteStore: each tenant's records numbered by its `audit_head` row,
//! an append one transaction (the number, the record, the oldest past the bound dropped).

use super::*;
use crate::store::{Actor, AuditQuery, AuditRecord, AuditStore, Setting, AUDIT_PER_TENANT};

const COLUMNS: &str = "tenant, seq, at, actor, setting, before, after";

/// A row as read (columns in [`COLUMNS`]' order); an actor this build does not know is read
/// as [`Actor::Other`].
fn record(r: &rusqlite::Row<'_>) -> Sql<AuditRecord> {
    let actor: String = r.get(3)?;
    let setting: String = r.get(4)?;
    let mut rec = AuditRecord::new(
        TenantId::from(r.get::<_, String>(0)?),
        r.get(2)?,
        Actor::parse(&actor).unwrap_or(Actor::Other(actor)),
        Setting::parse(&setting),
        r.get(5)?,
        r.get(6)?,
    );
    rec.seq = r.get(1)?;
    Ok(rec)
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, record: &AuditRecord) -> Result<i64, StoreError> {
        let r = record.clone();
        self.write(move |tx, _| {
            let seq: i64 = tx
                .prepare_cached(
                    "INSERT INTO audit_head (tenant, seq) VALUES (?1, 1) \
                     ON CONFLICT (tenant) DO UPDATE SET seq = seq + 1 RETURNING seq",
                )?
                .query_row([r.tenant.as_str()], |row| row.get(0))?;
            let own = r.actor.is_tenant();
            tx.prepare_cached(&format!(
                "INSERT INTO audit_log ({COLUMNS}, own) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))?
            .execute(params![
                r.tenant.as_str(),
                seq,
                r.at,
                r.actor.to_stored(),
                r.setting.as_str(),
                r.before,
                r.after,
                own
            ])?;
            // The tenant's records of this kind past the newest AUDIT_PER_TENANT.
            tx.prepare_cached(
                "DELETE FROM audit_log WHERE tenant = ?1 AND own = ?2 AND seq <= (SELECT seq FROM audit_log \
                 WHERE tenant = ?1 AND own = ?2 ORDER BY seq DESC LIMIT 1 OFFSET ?3)",
            )?
            .execute(params![r.tenant.as_str(), own, AUDIT_PER_TENANT])?;
            Ok(seq)
        })
        .await
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let q = query.clone();
        self.read(move |tx| {
            let limit = q.limit.max(1) as i64;
            let rows = match &q.tenant {
                Some(t) => tx
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM audit_log WHERE tenant = ?1 AND seq < ?2 AND at >= ?3 \
                         ORDER BY seq DESC LIMIT ?4"
                    ))?
                    .query_map(
                        params![t.as_str(), q.before.as_ref().map_or(i64::MAX, |c| c.seq), q.since, limit],
                        record,
                    )?
                    .collect::<Sql<Vec<_>>>()?,
                None => {
                    let (at, tenant, seq) =
                        q.before.as_ref().map_or((i64::MAX, String::new(), 0), |c| (c.at, c.tenant.to_string(), c.seq));
                    tx.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM audit_log WHERE (at, tenant, seq) < (?1, ?2, ?3) AND at >= ?4 \
                         AND at <= ?6 ORDER BY at DESC, tenant DESC, seq DESC LIMIT ?5"
                    ))?
                    .query_map(params![at, tenant, seq, q.since, limit, q.now], record)?
                    .collect::<Sql<Vec<_>>>()?
                }
            };
            Ok(q.finish(rows))
        })
        .await
    }

    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        self.write(move |tx, _| Ok(tx.prepare_cached("DELETE FROM audit_log WHERE at < ?1")?.execute([before])? as u64))
            .await
    }
}
