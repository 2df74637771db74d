//! The export role of the PostgresStore: claims are conditional updates with an expiry.

use super::*;

/// The condition that `claim` may take the export of revision `$4` of the row: the revision
/// has not moved, it is not dead-lettered, no other node (`$5`) holds an unexpired claim (at
/// `$6`).
const CLAIMABLE: &str = "revision = $4 AND dead IS NULL \
     AND NOT (claim_node IS NOT NULL AND claim_until IS NOT NULL AND claim_node <> $5 AND claim_until > $6)";

const KEY: &str = "tenant = $1 AND meter = $2 AND window_start = $3";

#[async_trait]
impl ExportStore for PostgresStore {
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        let limit = int(limit as u64);
        // The conditions repeat the partial index's, so that the server reads only pending rows.
        let pending = "u.dead IS NULL AND u.billable AND (u.quantity > u.exported OR u.in_flight IS NOT NULL)";
        let (first, next) = (
            self.sql(&format!(
                "SELECT {AGGREGATE_COLUMNS} FROM {{s}}.usage u WHERE {pending} AND u.window_start < $1 \
                 ORDER BY u.tenant, u.meter, u.window_start LIMIT $2"
            )),
            self.sql(&format!(
                "SELECT {AGGREGATE_COLUMNS} FROM {{s}}.usage u WHERE {pending} AND u.window_start < $1 \
                 AND (u.tenant, u.meter, u.window_start) > ($2, $3, $4) \
                 ORDER BY u.tenant, u.meter, u.window_start LIMIT $5"
            )),
        );
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = match after {
                None => client.query_typed(&first, args![window_start_before, limit]).await?,
                Some(k) => {
                    client
                        .query_typed(
                            &next,
                            args![window_start_before, k.tenant.as_str(), k.meter.as_str(), k.window_start, limit],
                        )
                        .await?
                }
            };
            Ok(rows.iter().map(aggregate).collect())
        })
        .await
    }

    async fn begin_export(
        &self,
        aggregate_read: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        let key = &aggregate_read.key;
        let (quantity, send) = (int(aggregate_read.quantity), send.to_json());
        let planned_anew = aggregate_read.in_flight.is_none() || aggregate_read.first_attempt_at.is_none();
        // Nothing in flight, or nothing of it may have reached the billing system (no first
        // attempt recorded) and the caller planned it so ($10: from the quantity it read):
        // fixed anew. The right-hand sides read the row as it was.
        let sql = self.sql(&format!(
            "UPDATE {{s}}.usage u SET claim_node = $5, claim_until = $7, attempts = attempts + 1, \
             first_attempt_at = coalesce(first_attempt_at, $6), \
             send = CASE WHEN in_flight IS NULL OR (first_attempt_at IS NULL AND $10) THEN $9 ELSE send END, \
             in_flight = CASE WHEN in_flight IS NULL OR (first_attempt_at IS NULL AND $10) \
             THEN LEAST(quantity, $8) ELSE in_flight END \
             WHERE {KEY} AND {CLAIMABLE} RETURNING {AGGREGATE_COLUMNS}"
        ));
        self.retrying(|| async {
            let client = self.client().await?;
            let row = client
                .query_typed_opt(
                    &sql,
                    args![
                        key.tenant.as_str(),
                        key.meter.as_str(),
                        key.window_start,
                        i64::from(aggregate_read.revision),
                        node_int(claim.node),
                        claim.now,
                        claim.until,
                        quantity,
                        send.as_str(),
                        planned_anew
                    ],
                )
                .await?;
            Ok(row.as_ref().map(aggregate))
        })
        .await
    }

    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        deferral: Deferral,
    ) -> Result<bool, StoreError> {
        let key = &aggregate.key;
        let sql = self.sql(&format!(
            "UPDATE {{s}}.usage SET claim_node = $5, claim_until = $7, unknown_failures = unknown_failures + $8, \
             first_attempt_at = CASE WHEN attempts = $9 THEN NULL ELSE first_attempt_at END \
             WHERE {KEY} AND {CLAIMABLE} AND in_flight IS NOT NULL RETURNING 1"
        ));
        let never_sent = match deferral {
            Deferral::NeverSent(n) => i64::from(n),
            // Never equal to a count of attempts.
            _ => -1,
        };
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = client
                .query_typed(
                    &sql,
                    args![
                        key.tenant.as_str(),
                        key.meter.as_str(),
                        key.window_start,
                        i64::from(aggregate.revision),
                        node_int(claim.node),
                        claim.now,
                        claim.until,
                        i64::from(deferral == Deferral::Unknown),
                        never_sent
                    ],
                )
                .await?;
            Ok(!rows.is_empty())
        })
        .await
    }

    async fn finish_export(&self, aggregate: &UsageAggregate, now: i64) -> Result<bool, StoreError> {
        let key = &aggregate.key;
        // What was in flight, as stored, goes in the ledger in the same transaction as the mark.
        let read = self.sql(&format!(
            "SELECT send FROM {{s}}.usage WHERE {KEY} AND revision = $4 AND in_flight IS NOT NULL FOR UPDATE"
        ));
        let mark = self.sql(&format!(
            "UPDATE {{s}}.usage SET exported = in_flight, in_flight = NULL, send = NULL, dead = NULL, \
             billable = CASE WHEN quantity <= in_flight THEN false ELSE billable END, \
             revision = revision + 1, attempts = 0, unknown_failures = 0, first_attempt_at = NULL, claim_node = NULL, \
             claim_until = NULL WHERE {KEY} AND revision = $4 AND in_flight IS NOT NULL"
        ));
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let (t, m, rev) = (key.tenant.as_str(), key.meter.as_str(), i64::from(aggregate.revision));
            let args = args![t, m, key.window_start, rev];
            let Some(row) = tx.query_typed_opt(&read, args).await? else {
                tx.commit().await?;
                return Ok(false);
            };
            let sent: Option<String> = row.get(0);
            tx.query_typed(&mark, args).await?;
            if let Some(send) = sent.as_deref().and_then(ExportSend::from_json).filter(|s| s.customer.is_some()) {
                let entry = LedgerEntry::new(key.clone(), aggregate.revision, send, Some(now));
                self.put_ledger(&tx, &entry, now).await?;
            }
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        let key = &aggregate.key;
        let sql = self.sql(&format!("UPDATE {{s}}.usage SET dead = $5 WHERE {KEY} AND revision = $4"));
        self.retrying(|| async {
            let client = self.client().await?;
            client
                .query_typed(
                    &sql,
                    args![
                        key.tenant.as_str(),
                        key.meter.as_str(),
                        key.window_start,
                        i64::from(aggregate.revision),
                        reason
                    ],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let limit = int(limit as u64);
        let columns = "SELECT tenant, meter, window_start, quantity - exported, dead, revision, send FROM {s}.usage \
                       WHERE dead IS NOT NULL";
        let first = self.sql(&format!("{columns} ORDER BY tenant, meter, window_start LIMIT $1"));
        let next = self.sql(&format!(
            "{columns} AND (tenant, meter, window_start) > ($2, $3, $4) ORDER BY tenant, meter, window_start LIMIT $1"
        ));
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = match after {
                None => client.query_typed(&first, args![limit]).await?,
                Some(k) => {
                    client.query_typed(&next, args![limit, k.tenant.as_str(), k.meter.as_str(), k.window_start]).await?
                }
            };
            Ok(rows
                .iter()
                .map(|r| {
                    let key = ExportKey::new(r.get::<_, String>(0).into(), r.get::<_, String>(1).into(), r.get(2));
                    let mut d = DeadLetter::new(key, uint(r.get(3)), r.get::<_, String>(4));
                    d.revision = small(r.get(5));
                    d.send = r.get::<_, Option<String>>(6).as_deref().and_then(ExportSend::from_json);
                    d
                })
                .collect())
        })
        .await
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        let sql = self.sql(&format!(
            "UPDATE {{s}}.usage SET dead = NULL, in_flight = NULL, send = NULL, revision = revision + 1, \
             attempts = 0, unknown_failures = 0, first_attempt_at = NULL, claim_node = NULL, claim_until = NULL \
             WHERE {KEY} AND dead IS NOT NULL RETURNING 1"
        ));
        self.retrying(|| async {
            let client = self.client().await?;
            let rows =
                client.query_typed(&sql, args![key.tenant.as_str(), key.meter.as_str(), key.window_start]).await?;
            Ok(rows.len() == 1)
        })
        .await
    }

    async fn identifier_namespace(&self) -> Result<String, StoreError> {
        let sql = self.sql("SELECT value FROM {s}.meta WHERE key = 'namespace'");
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(client.query_typed_opt(&sql, &[]).await?.map(|r| r.get::<_, String>(0)).unwrap_or_default())
        })
        .await
    }

    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError> {
        // One conditional write: the namespace row is replaced only if it still holds `current`.
        let sql = self.sql("UPDATE {s}.meta SET value = $2 WHERE key = 'namespace' AND value = $1 RETURNING 1");
        self.retrying(|| async {
            let client = self.client().await?;
            Ok(!client.query_typed(&sql, args![current, new]).await?.is_empty())
        })
        .await
    }
}
