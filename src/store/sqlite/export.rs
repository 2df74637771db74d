//! The export role of the SqliteStore.

use super::ledger::put_ledger;
use super::*;

#[async_trait]
impl ExportStore for SqliteStore {
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            // The conditions repeat the partial index's, so that SQLite reads only the pending rows.
            let pending = "u.dead IS NULL AND u.billable = 1 AND (u.quantity > u.exported OR u.in_flight IS NOT NULL)";
            let rows = match &after {
                None => tx
                    .prepare_cached(&format!(
                        "SELECT {AGGREGATE_COLUMNS} FROM usage u \
                         WHERE {pending} AND u.window_start < ?1 \
                         ORDER BY u.tenant, u.meter, u.window_start LIMIT ?2"
                    ))?
                    .query_map(params![window_start_before, limit], aggregate)?
                    .collect::<Sql<Vec<_>>>(),
                Some(k) => tx
                    .prepare_cached(&format!(
                        "SELECT {AGGREGATE_COLUMNS} FROM usage u \
                         WHERE {pending} AND u.window_start < ?1 \
                         AND (u.tenant, u.meter, u.window_start) > (?2, ?3, ?4) \
                         ORDER BY u.tenant, u.meter, u.window_start LIMIT ?5"
                    ))?
                    .query_map(
                        params![window_start_before, k.tenant.as_str(), k.meter.as_str(), k.window_start, limit],
                        aggregate,
                    )?
                    .collect::<Sql<Vec<_>>>(),
            };
            rows
        })
        .await
    }

    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        let (key, revision, claim) = (aggregate.key.clone(), aggregate.revision, *claim);
        let (quantity, send) = (int(aggregate.quantity), send.to_json());
        let planned_anew = aggregate.in_flight.is_none() || aggregate.first_attempt_at.is_none();
        self.write(move |tx, _| {
            if !export_claimable(tx, &key, revision, &claim, false)? {
                return Ok(None);
            }
            tx.prepare_cached(
                // Nothing in flight, or nothing of it may have reached the billing system (no
                // first attempt recorded) and the caller planned it so (?9: from the quantity it
                // read): fixed (anew). The right-hand sides read the row as it was.
                "UPDATE usage SET claim_node = ?4, claim_until = ?5, attempts = attempts + 1, \
                 first_attempt_at = coalesce(first_attempt_at, ?6), \
                 send = CASE WHEN in_flight IS NULL OR (first_attempt_at IS NULL AND ?9) THEN ?8 ELSE send END, \
                 in_flight = CASE WHEN in_flight IS NULL OR (first_attempt_at IS NULL AND ?9) \
                 THEN min(quantity, ?7) ELSE in_flight END \
                 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3",
            )?
            .execute(params![
                key.tenant.as_str(),
                key.meter.as_str(),
                key.window_start,
                node_int(claim.node),
                claim.until,
                claim.now,
                quantity,
                send,
                planned_anew
            ])?;
            usage_of(tx, &key)
        })
        .await
    }

    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        deferral: Deferral,
    ) -> Result<bool, StoreError> {
        let (key, revision, claim) = (aggregate.key.clone(), aggregate.revision, *claim);
        self.write(move |tx, _| {
            if !export_claimable(tx, &key, revision, &claim, true)? {
                return Ok(false);
            }
            tx.prepare_cached(
                "UPDATE usage SET claim_node = ?4, claim_until = ?5, unknown_failures = unknown_failures + ?6, \
                 first_attempt_at = CASE WHEN attempts = ?7 THEN NULL ELSE first_attempt_at END \
                 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3",
            )?
            .execute(params![
                key.tenant.as_str(),
                key.meter.as_str(),
                key.window_start,
                node_int(claim.node),
                claim.until,
                i64::from(deferral == Deferral::Unknown),
                // -1: never equal to a count of attempts.
                match deferral {
                    Deferral::NeverSent(n) => i64::from(n),
                    _ => -1,
                }
            ])?;
            Ok(true)
        })
        .await
    }

    async fn finish_export(&self, aggregate: &UsageAggregate, now: i64) -> Result<bool, StoreError> {
        let (key, revision) = (aggregate.key.clone(), aggregate.revision);
        self.write(move |tx, _| {
            // What was in flight, as stored: it goes in the ledger with the mark.
            let sent: Option<String> = tx
                .prepare_cached(
                    "SELECT send FROM usage WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 \
                     AND revision = ?4 AND in_flight IS NOT NULL",
                )?
                .query_row(params![key.tenant.as_str(), key.meter.as_str(), key.window_start, i64::from(revision)], |r| {
                    r.get(0)
                })
                .optional()?
                .flatten();
            let changed = tx
                .prepare_cached(
                    "UPDATE usage SET exported = in_flight, in_flight = NULL, send = NULL, dead = NULL, \
                     billable = CASE WHEN quantity <= in_flight THEN 0 ELSE billable END, \
                     revision = revision + 1, attempts = 0, unknown_failures = 0, first_attempt_at = NULL, claim_node = NULL, \
                     claim_until = NULL WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND revision = ?4 \
                     AND in_flight IS NOT NULL",
                )?
                .execute(params![key.tenant.as_str(), key.meter.as_str(), key.window_start, i64::from(revision)])?;
            if changed == 1 {
                if let Some(send) = sent.as_deref().and_then(ExportSend::from_json).filter(|s| s.customer.is_some()) {
                    let entry = LedgerEntry::new(key.clone(), revision, send, Some(now));
                    put_ledger(tx, &entry, now)?;
                }
            }
            Ok(changed == 1)
        })
        .await
    }

    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        let (key, revision, reason) = (aggregate.key.clone(), aggregate.revision, reason.to_owned());
        self.write(move |tx, _| {
            tx.prepare_cached(
                "UPDATE usage SET dead = ?4 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND revision = ?5",
            )?
            .execute(params![
                key.tenant.as_str(),
                key.meter.as_str(),
                key.window_start,
                reason,
                i64::from(revision)
            ])?;
            Ok(())
        })
        .await
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            let row = |r: &Row<'_>| {
                let tenant: String = r.get(0)?;
                let meter: String = r.get(1)?;
                let key = ExportKey::new(tenant.into(), meter.into(), r.get(2)?);
                let mut d = DeadLetter::new(key, uint(r.get(3)?), r.get::<_, String>(4)?);
                d.revision = u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX);
                d.send = r.get::<_, Option<String>>(6)?.as_deref().and_then(ExportSend::from_json);
                Ok(d)
            };
            let (sql, cursor) = match &after {
                None => ("", None),
                Some(k) => ("AND (tenant, meter, window_start) > (?2, ?3, ?4)", Some(k)),
            };
            let sql = format!(
                "SELECT tenant, meter, window_start, quantity - exported, dead, revision, send FROM usage \
                 WHERE dead IS NOT NULL {sql} ORDER BY tenant, meter, window_start LIMIT ?1"
            );
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = match cursor {
                None => stmt.query_map(params![limit], row)?.collect::<Sql<Vec<_>>>(),
                Some(k) => stmt
                    .query_map(params![limit, k.tenant.as_str(), k.meter.as_str(), k.window_start], row)?
                    .collect::<Sql<Vec<_>>>(),
            };
            rows
        })
        .await
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.write(move |tx, _| {
            let changed = tx
                .prepare_cached(
                    "UPDATE usage SET dead = NULL, in_flight = NULL, send = NULL, revision = revision + 1, \
                     attempts = 0, unknown_failures = 0, first_attempt_at = NULL, claim_node = NULL, claim_until = NULL \
                     WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3 AND dead IS NOT NULL",
                )?
                .execute(params![key.tenant.as_str(), key.meter.as_str(), key.window_start])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn identifier_namespace(&self) -> Result<String, StoreError> {
        self.read(|tx| {
            tx.prepare_cached("SELECT value FROM meta WHERE key = 'namespace'")?
                .query_row([], |r| r.get::<_, String>(0))
                .optional()
                // A file made before namespaces: its identifiers as they were.
                .map(Option::unwrap_or_default)
        })
        .await
    }

    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError> {
        let (current, new) = (current.to_owned(), new.to_owned());
        self.write(move |tx, _| {
            let stored: String = tx
                .prepare_cached("SELECT value FROM meta WHERE key = 'namespace'")?
                .query_row([], |r| r.get(0))
                .optional()?
                .unwrap_or_default();
            if stored != current {
                return Ok(false);
            }
            tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('namespace', ?1)")?.execute([&new])?;
            Ok(true)
        })
        .await
    }
}

/// Whether `claim` may take (or, `in_flight`, hold) the export of `revision` of `key`: the
/// revision has not moved, it is not dead-lettered, no other node holds an unexpired claim.
fn export_claimable(
    tx: &Transaction<'_>,
    key: &ExportKey,
    revision: u32,
    claim: &ExportClaim,
    in_flight: bool,
) -> Sql<bool> {
    type State = (i64, bool, bool, Option<i64>, Option<i64>);
    let state: Option<State> = tx
        .prepare_cached(
            "SELECT revision, dead IS NOT NULL, in_flight IS NOT NULL, claim_node, claim_until FROM usage \
             WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3",
        )?
        .query_row(params![key.tenant.as_str(), key.meter.as_str(), key.window_start], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((stored, dead, flying, node, until)) = state else { return Ok(false) };
    let held_by_other = matches!((node, until), (Some(n), Some(u)) if n != node_int(claim.node) && u > claim.now);
    Ok(stored == i64::from(revision) && !dead && (flying || !in_flight) && !held_by_other)
}
