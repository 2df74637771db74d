//! The alerts role of the SqliteStore: the outbox, each call one transaction (SQLite serializes
//! writers: a claim's read is the compare of its compare-and-set).

use super::*;
use crate::store::{AlertClaim, AlertKey, AlertOutcome, AlertQuery, AlertState, OutboxEntry, OutboxStore};

const COLUMNS: &str = "id, destination, tenant, event, body, created_at, keep_until, state, attempts, next_at, \
                       claim_owner, claim_until, last_error, delivered_at";

/// A row as read (columns in [`COLUMNS`]' order).
fn entry(r: &rusqlite::Row<'_>) -> Sql<OutboxEntry> {
    let state: String = r.get(7)?;
    let mut e = OutboxEntry::new(
        AlertKey::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
        TenantId::from(r.get::<_, String>(2)?),
        r.get::<_, String>(3)?,
        r.get::<_, String>(4)?,
        r.get(5)?,
        r.get(6)?,
    );
    e.state = AlertState::parse(&state).unwrap_or(AlertState::Dead);
    e.attempts = u32::try_from(r.get::<_, i64>(8)?).unwrap_or(u32::MAX);
    e.next_at = r.get(9)?;
    e.claim = (r.get::<_, i64>(10)? as u64, r.get(11)?);
    e.last_error = r.get(12)?;
    e.delivered_at = r.get(13)?;
    Ok(e)
}

/// Writes `e` over its row (or as a new one).
fn put(tx: &Transaction<'_>, e: &OutboxEntry, only_new: bool) -> Sql<usize> {
    let verb = if only_new { "INSERT OR IGNORE" } else { "INSERT OR REPLACE" };
    tx.prepare_cached(&format!(
        "{verb} INTO alert_outbox ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))?
    .execute(params![
        e.key.id,
        e.key.destination,
        e.tenant.as_str(),
        e.event,
        e.body,
        e.created_at,
        e.keep_until,
        e.state.as_str(),
        i64::from(e.attempts),
        e.next_at,
        e.claim.0 as i64,
        e.claim.1,
        e.last_error,
        e.delivered_at,
    ])
}

/// The row of `key`.
fn get(tx: &Transaction<'_>, key: &AlertKey) -> Sql<Option<OutboxEntry>> {
    tx.prepare_cached(&format!("SELECT {COLUMNS} FROM alert_outbox WHERE id = ?1 AND destination = ?2"))?
        .query_row(params![key.id, key.destination], entry)
        .optional()
}

/// Applies `change` to the row of `key` and writes it back when it says so.
async fn change(
    store: &SqliteStore,
    key: &AlertKey,
    change: impl Fn(&mut OutboxEntry) -> bool + Send + 'static,
) -> Result<bool, StoreError> {
    let key = key.clone();
    store
        .write(move |tx, _| {
            let Some(mut e) = get(tx, &key)? else { return Ok(false) };
            if !change(&mut e) {
                return Ok(false);
            }
            put(tx, &e, false)?;
            Ok(true)
        })
        .await
}

#[async_trait]
impl OutboxStore for SqliteStore {
    async fn put_alerts(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError> {
        let entries = entries.to_vec();
        self.write(move |tx, _| {
            let mut written = 0;
            for e in &entries {
                written += put(tx, e, true)?;
            }
            Ok(written)
        })
        .await
    }

    async fn claim_alerts(&self, claim: &AlertClaim) -> Result<Vec<OutboxEntry>, StoreError> {
        let claim = *claim;
        // Read first: the nodes' passes every second take no write lock on an idle outbox.
        let due: bool = self
            .read(move |tx| {
                tx.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM alert_outbox WHERE state = 'pending' AND next_at <= ?1 \
                     AND claim_until <= ?1)",
                )?
                .query_row([claim.now], |r| r.get(0))
            })
            .await?;
        if !due {
            return Ok(Vec::new());
        }
        self.write(move |tx, _| {
            let due: Vec<OutboxEntry> = tx
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM alert_outbox WHERE state = 'pending' AND next_at <= ?1 \
                     AND claim_until <= ?1 ORDER BY next_at, id, destination LIMIT ?2"
                ))?
                .query_map(params![claim.now, claim.limit as i64], entry)?
                .collect::<Sql<_>>()?;
            let mut claimed = Vec::with_capacity(due.len());
            for mut e in due {
                e.claimed(claim.owner, claim.until);
                tx.prepare_cached(
                    "UPDATE alert_outbox SET claim_owner = ?3, claim_until = ?4 WHERE id = ?1 AND destination = ?2",
                )?
                .execute(params![e.key.id, e.key.destination, claim.owner as i64, claim.until])?;
                claimed.push(e);
            }
            Ok(claimed)
        })
        .await
    }

    async fn settle_alert(&self, key: &AlertKey, owner: u64, outcome: &AlertOutcome) -> Result<bool, StoreError> {
        let outcome = outcome.clone();
        change(self, key, move |e| e.settle(owner, &outcome)).await
    }

    async fn list_alerts(&self, query: &AlertQuery) -> Result<Vec<OutboxEntry>, StoreError> {
        let query = query.clone();
        self.read(move |tx| {
            let (id, destination) =
                query.after.as_ref().map_or((String::new(), String::new()), |k| (k.id.clone(), k.destination.clone()));
            let rows = tx
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM alert_outbox WHERE (id, destination) > (?1, ?2) \
                     AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR id = ?4) \
                     ORDER BY id, destination LIMIT ?5"
                ))?
                .query_map(
                    params![id, destination, query.state.map(AlertState::as_str), query.id, query.limit.max(1) as i64],
                    entry,
                )?
                .collect::<Sql<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn requeue_alert(&self, key: &AlertKey, now: i64) -> Result<bool, StoreError> {
        change(self, key, move |e| e.requeue(now)).await
    }

    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError> {
        self.write(move |tx, _| {
            let gone = tx
                .prepare_cached("DELETE FROM alert_outbox WHERE state != 'pending' AND keep_until < ?1")?
                .execute([now])?;
            Ok(gone as u64)
        })
        .await
    }
}
