//! The quota role of the SqliteStore.

use super::*;

#[async_trait]
impl QuotaStore for SqliteStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let r = r.clone();
        self.write(move |tx, _| {
            let period = r.key.period_tag();
            let Some(reserved) = counter(tx, &r.key, &period)? else {
                // A late call for a period long over: nothing is left to reserve in it.
                return Ok(Grant::new(0, 0));
            };
            if let Some(grant) = seen(tx, &r.key, &period, r.token, reserved)? {
                return Ok(grant);
            }
            let reserved = uint(reserved).saturating_add(r.owed);
            let granted = match r.limit {
                Some(limit) => r.grant_for(limit.saturating_sub(reserved)),
                None => r.units,
            };
            let grant = Grant::new(granted, reserved.saturating_add(granted));
            applied(tx, &r.key, &period, r.token, grant)?;
            Ok(grant)
        })
        .await
    }

    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        let key = key.clone();
        self.write(move |tx, _| {
            let period = key.period_tag();
            if let Some(reserved) = counter(tx, &key, &period)? {
                if seen(tx, &key, &period, token, reserved)?.is_none() {
                    let grant = Grant::new(0, uint(reserved).saturating_sub(units));
                    applied(tx, &key, &period, token, grant)?;
                }
            }
            Ok(())
        })
        .await
    }
}

/// The counter of `key`'s reserved units, created if its period is still of use (dropping the
/// periods of the same tenant and meter that ended before it started); `None` for a period
/// already dropped.
fn counter(tx: &Transaction<'_>, key: &QuotaKey, period: &str) -> Sql<Option<i64>> {
    let (t, m) = (key.tenant.as_str(), key.meter.as_str());
    let floor: Option<i64> = tx
        .prepare_cached("SELECT dropped_before FROM quota_floor WHERE tenant = ?1 AND meter = ?2")?
        .query_row(params![t, m], |r| r.get(0))
        .optional()?;
    if floor.is_some_and(|f| key.end <= f) {
        return Ok(None);
    }
    let reserved: Option<i64> = tx
        .prepare_cached(
            "SELECT reserved FROM quota WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
        )?
        .query_row(params![t, m, period, key.start, key.end], |r| r.get(0))
        .optional()?;
    if let Some(reserved) = reserved {
        return Ok(Some(reserved));
    }
    let ended: Option<i64> = tx
        .prepare_cached("SELECT max(end) FROM quota WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
        .query_row(params![t, m, key.start], |r| r.get(0))?;
    if let Some(ended) = ended {
        tx.prepare_cached("DELETE FROM quota WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
            .execute(params![t, m, key.start])?;
        tx.prepare_cached("DELETE FROM quota_sender WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
            .execute(params![t, m, key.start])?;
        tx.prepare_cached(
            "INSERT INTO quota_floor (tenant, meter, dropped_before) VALUES (?1, ?2, ?3) \
             ON CONFLICT (tenant, meter) DO UPDATE SET dropped_before = max(dropped_before, excluded.dropped_before)",
        )?
        .execute(params![t, m, ended])?;
    }
    tx.prepare_cached(
        "INSERT INTO quota (tenant, meter, period, start, end, reserved) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
    )?
    .execute(params![t, m, period, key.start, key.end])?;
    Ok(Some(0))
}

/// Whether the call with `token` was applied already: `Some(grant)` answers it again.
fn seen(tx: &Transaction<'_>, key: &QuotaKey, period: &str, token: ReserveToken, reserved: i64) -> Sql<Option<Grant>> {
    let last: Option<(i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT seq, granted, reserved FROM quota_sender \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 AND node = ?6",
        )?
        .query_row(
            params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end, node_int(token.node)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let seq = int(token.seq);
    Ok(match last {
        Some((last, granted, then)) if seq <= last => {
            Some(if seq == last { Grant::new(uint(granted), uint(then)) } else { Grant::new(0, uint(reserved)) })
        }
        _ => None,
    })
}

/// Sets the counter and records the answer to `token`'s call (keeping the newest senders).
fn applied(tx: &Transaction<'_>, key: &QuotaKey, period: &str, token: ReserveToken, grant: Grant) -> Sql<()> {
    let (t, m) = (key.tenant.as_str(), key.meter.as_str());
    tx.prepare_cached(
        "UPDATE quota SET reserved = ?6 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
    )?
    .execute(params![t, m, period, key.start, key.end, int(grant.reserved)])?;
    tx.prepare_cached(
        "INSERT INTO quota_sender (tenant, meter, period, start, end, node, seq, granted, reserved) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (tenant, meter, period, start, end, node) \
         DO UPDATE SET seq = excluded.seq, granted = excluded.granted, reserved = excluded.reserved",
    )?
    .execute(params![
        t,
        m,
        period,
        key.start,
        key.end,
        node_int(token.node),
        int(token.seq),
        int(grant.granted),
        int(grant.reserved)
    ])?;
    tx.prepare_cached(
        "DELETE FROM quota_sender WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 \
         AND node NOT IN (SELECT node FROM quota_sender \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 \
             ORDER BY seq DESC LIMIT ?6)",
    )?
    .execute(params![t, m, period, key.start, key.end, int(contract::SENDERS_KEPT as u64)])?;
    Ok(())
}
