//! The quota role of the SqliteStore.

use super::*;
use crate::{
    base::MeterId,
    store::{
        quota::{
            close_against, close_used_up, expire, expire_against, fits, forgive, forgiven_by_json, forgiven_by_of,
            forgotten, kept_refund_json, kept_refund_of, mark, mark_after, newer_refund, refund_against,
            release_against, standing, takes_json, takes_of, CreditRefund, ForgivenBy, Keeping, SenderCall, UsedTaken,
        },
        CapMode, CreditBalance, CreditClosure, CreditGrant, GrantOutcome, Kept, RechargeMode, RechargeState,
        RefundOutcome, Release, SpendCap,
    },
};

/// A reserve in its transaction ([`QuotaStore::reserve`] without its recharge).
fn reserve_in(tx: &Transaction<'_>, r: &Reservation) -> Sql<Grant> {
    // The tenant's own cap, set first in the same transaction.
    let cap = cap_of(tx, r)?;
    let period = r.key.period_tag();
    let Some((reserved, limit)) = counter(tx, &r.key, &period)? else {
        // A late call for a period long over: nothing is left to reserve in it.
        return Ok(Grant::new(0, 0).with_cap(cap));
    };
    if let Some(grant) = seen(tx, &r.key, &period, r.token, reserved)? {
        return Ok(grant.with_limit(limit).with_cap(cap));
    }
    let (reserved, kept, expired) = expire_for(tx, &r.key, &period, r.token, uint(reserved), r.kept)?;
    let reserved = reserved.saturating_add(r.owed);
    // A prepaid balance is held to its grants, whatever the caller says; a spend cap
    // to the tenant's own cap when it set one.
    let granted = match limit.or(r.limit_under(cap)) {
        Some(limit) => r.grant_for(limit.saturating_sub(reserved)),
        None => r.units,
    };
    let grant = Grant::new(granted, reserved.saturating_add(granted)).with_limit(limit).with_expired(expired);
    let grant =
        applied(tx, &r.key, &period, r.token, grant, Keeping::after(kept, granted, r.taking, r.expires_at), true)?;
    Ok(grant.with_cap(cap))
}

#[async_trait]
impl QuotaStore for SqliteStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let r = r.clone();
        self.write(move |tx, _| {
            let grant = reserve_in(tx, &r)?;
            if r.recharge == RechargeMode::Ignored {
                return Ok(grant);
            }
            // The tenant's recharge, in the reserve's transaction: the balance it checks is
            // the one the reserve left.
            let (t, m) = (r.key.tenant.as_str(), r.key.meter.as_str());
            let mut state = stored_recharge(tx, &r.key.tenant, &r.key.meter)?.unwrap_or_default();
            let before = state.clone();
            let seen = state.apply(r.recharge.clone(), prepaid_balance(tx, &r.key.tenant, &r.key.meter)?);
            if state != before {
                tx.prepare_cached(
                    "INSERT INTO quota_recharge (tenant, meter, state) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (tenant, meter) DO UPDATE SET state = excluded.state",
                )?
                .execute(params![t, m, state.to_json()])?;
            }
            Ok(grant.with_recharge(seen))
        })
        .await
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        let releases = releases.to_vec();
        let n = releases.len();
        // One transaction for the batch: each release is applied in it, or the whole batch
        // fails (and each is sent again alone by its sender).
        match self.write(move |tx, _| releases.iter().try_for_each(|r| release_one(tx, r))).await {
            Ok(()) => (0..n).map(|_| Ok(())).collect(),
            Err(e) => (0..n).map(|_| Err(e.duplicate())).collect(),
        }
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        let grant = grant.clone();
        self.write(move |tx, _| {
            let (t, m) = (grant.tenant.as_str(), grant.meter.as_str());
            // One grant per id and per payment, on any meter of the tenant.
            let seen: Option<CreditGrant> = tx
                .prepare_cached(&format!(
                    "SELECT {CREDIT_COLUMNS} FROM credit WHERE tenant = ?1 \
                     AND (id = ?2 OR (?3 IS NOT NULL AND payment = ?3)) ORDER BY meter = ?4 DESC, id = ?2 DESC LIMIT 1"
                ))?
                .query_row(params![t, grant.id, grant.payment, m], credit_row)
                .optional()?;
            if let Some(seen) = seen {
                return Ok(GrantOutcome::Duplicate(seen));
            }
            let open: i64 = tx
                .prepare_cached("SELECT count(*) FROM credit WHERE tenant = ?1 AND meter = ?2 AND closed_at IS NULL")?
                .query_row(params![t, m], |r| r.get(0))?;
            if uint(open) >= contract::OPEN_GRANTS_MAX as u64 {
                // Used-up grants close first, losing nothing, to make room.
                let b = Balance::read(tx, &grant.tenant, &grant.meter)?;
                let kept =
                    crate::store::quota::kept_of(keepings(tx, &b.key, &b.period)?.iter().map(|(_, k)| k)).total();
                let (ids, after) = close_used_up(&b.open, b.now, kept);
                if ids.is_empty() {
                    return Ok(GrantOutcome::TooMany);
                }
                set_balance(tx, &b.key, &b.period, after.granted, after.reserved)?;
                // The units left the bottom of the used total: each sender's last call is that
                // much lower in it now (so a later close or refund finds its lease where it is).
                let k = &b.key;
                tx.prepare_cached(
                    "UPDATE quota_sender SET reserved = max(reserved - ?6, 0) \
                     WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
                )?
                .execute(params![
                    t,
                    m,
                    b.period,
                    k.start,
                    k.end,
                    int(b.now.reserved - after.reserved)
                ])?;
                let mut close = tx.prepare_cached(
                    "UPDATE credit SET closed_at = ?4, revoked = 0, lost = 0 \
                     WHERE tenant = ?1 AND meter = ?2 AND id = ?3 AND closed_at IS NULL",
                )?;
                for id in &ids {
                    close.execute(params![t, m, id, grant.granted_at])?;
                }
                prune_closed(tx, t, m, grant.granted_at)?;
            }
            let key = prepaid_key(&grant.tenant, &grant.meter);
            let period = key.period_tag();
            let (reserved, granted) = counter(tx, &key, &period)?.expect("the prepaid period never ends");
            if !fits(granted.unwrap_or(0), grant.units) {
                return Ok(GrantOutcome::TooLarge);
            }
            tx.prepare_cached(
                "INSERT INTO credit (tenant, meter, id, units, granted_at, expires_at, payment, paid, bought) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?4)",
            )?
            .execute(params![
                t,
                m,
                grant.id,
                int(grant.units),
                grant.granted_at,
                grant.expires_at,
                grant.payment,
                grant.paid.map(int)
            ])?;
            let granted = granted.unwrap_or(0) + grant.units;
            set_balance(tx, &key, &period, granted, uint(reserved))?;
            // A refund of this payment that came first is applied now, in the same write.
            let kept: Vec<(String, String)> = tx
                .prepare_cached(
                    "SELECT payment, refund FROM credit_refund_kept \
                     WHERE payment = ?1 OR payment = ?2 OR invoice = ?2",
                )?
                .query_map(params![grant.payment.as_deref().unwrap_or(&grant.id), grant.id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Sql<_>>()?;
            let mut refund: Option<CreditRefund> = None;
            for (payment, json) in kept {
                tx.prepare_cached("DELETE FROM credit_refund_kept WHERE payment = ?1")?.execute([&payment])?;
                if let Some(r) = kept_refund_of(&json) {
                    refund = Some(match refund {
                        Some(before) => newer_refund(before, r),
                        None => r,
                    });
                }
            }
            if let Some(refund) = refund {
                let _ = apply_refund(tx, &grant.tenant, &grant.meter, &refund.landing(&grant))?;
            }
            let b = Balance::read(tx, &grant.tenant, &grant.meter)?;
            Ok(GrantOutcome::Granted(CreditBalance::new(b.now.granted, b.now.reserved)))
        })
        .await
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        let (tenant, meter) = (tenant.clone(), meter.cloned());
        self.read(move |tx| {
            let meters: Vec<String> = match &meter {
                Some(m) => vec![m.as_str().to_owned()],
                None => tx
                    .prepare_cached("SELECT DISTINCT meter FROM credit WHERE tenant = ?1 ORDER BY meter")?
                    .query_map([tenant.as_str()], |r| r.get(0))?
                    .collect::<Sql<_>>()?,
            };
            let mut grants = Vec::new();
            let mut balances = Vec::new();
            for m in meters {
                let mut list = grants_of(tx, tenant.as_str(), &m)?;
                if list.is_empty() {
                    continue;
                }
                list.sort_by(|a, b| a.spending_order().cmp(&b.spending_order()));
                grants.extend(list);
                let meter: MeterId = m.as_str().into();
                let key = prepaid_key(&tenant, &meter);
                let row: Option<(i64, Option<i64>)> = tx
                    .prepare_cached(
                        "SELECT reserved, granted FROM quota \
                         WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
                    )?
                    .query_row(params![tenant.as_str(), m, key.period_tag(), key.start, key.end], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                let balance = row.map_or_else(CreditBalance::default, |(reserved, granted)| {
                    CreditBalance::new(uint(granted.unwrap_or(0)), uint(reserved))
                });
                balances.push((meter, balance));
            }
            Ok((grants, balances))
        })
        .await
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        let (tenant, meter, id) = (tenant.clone(), meter.clone(), id.to_owned());
        self.write(move |tx, _| {
            let (t, m) = (tenant.as_str(), meter.as_str());
            let b = Balance::read(tx, &tenant, &meter)?;
            let Some(grant) = b.open.iter().find(|g| g.id == id) else { return Ok(None) };
            if !revoke && grant.expires_at.is_none_or(|at| at > now) {
                return Ok(None);
            }
            let Some((lost, after, used)) = close_against(&b.open, &id, b.now, revoke) else { return Ok(None) };
            b.write(tx, after, used, now)?;
            tx.prepare_cached(
                "UPDATE credit SET closed_at = ?4, revoked = ?5, lost = ?6 WHERE tenant = ?1 AND meter = ?2 AND id = ?3",
            )?
            .execute(params![t, m, id, now, revoke, int(lost)])?;
            // Closed grants are kept a while (their ids, for duplicates), then dropped.
            prune_closed(tx, t, m, now)?;
            Ok(Some(CreditClosure { at: now, revoked: revoke, lost }))
        })
        .await
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        let refund = refund.clone();
        self.write(move |tx, _| {
            let invoice = refund.invoice.as_deref().unwrap_or(&refund.payment);
            // Its open grant first, else a closed one it still reaches (closed used up).
            let found: Option<(String, String, bool)> = tx
                .prepare_cached(
                    "SELECT tenant, meter, closed_at IS NULL OR coalesce(NOT revoked AND lost = 0, 0) FROM credit \
                     WHERE payment = ?1 OR id = ?1 OR id = ?2 \
                     ORDER BY closed_at IS NULL DESC, coalesce(NOT revoked AND lost = 0, 0) DESC LIMIT 1",
                )?
                .query_row(params![refund.payment, invoice], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            match found {
                Some((tenant, meter, true)) => {
                    let (tenant, meter) = (TenantId::from(tenant.as_str()), MeterId::from(meter.as_str()));
                    Ok(apply_refund(tx, &tenant, &meter, &refund)?.unwrap_or_else(|outcome| outcome))
                }
                Some(_) => Ok(RefundOutcome::Nothing),
                None if refund.kept() => keep_refund(tx, &refund),
                None => Ok(RefundOutcome::Unknown),
            }
        })
        .await
    }

    async fn values(
        &self,
        call: &crate::store::ValueCall,
        mode: crate::store::ValueMode,
    ) -> Result<crate::store::HeldValues, StoreError> {
        self.apply_values(call, mode).await
    }

    async fn payments(
        &self,
        call: &crate::store::PaymentCall,
        now: i64,
    ) -> Result<crate::store::PaymentAnswer, StoreError> {
        let stored = |tx: &rusqlite::Transaction<'_>, tenant: &TenantId| -> Sql<Option<String>> {
            tx.prepare_cached("SELECT row FROM tenant_payment WHERE tenant = ?1")?
                .query_row([tenant.as_str()], |r| r.get(0))
                .optional()
        };
        let call = call.clone();
        if matches!(call, crate::store::PaymentCall::Read { .. }) {
            let tenant = call.tenant().clone();
            let json = self.read(move |tx| stored(tx, &tenant)).await?;
            return crate::store::PaymentRow::apply_json(json.as_deref(), &call, now).map(|(answer, _)| answer);
        }
        self.write(move |tx, _| {
            let json = stored(tx, call.tenant())?;
            let (answer, row) = match crate::store::PaymentRow::apply_json(json.as_deref(), &call, now) {
                Ok(applied) => applied,
                Err(e) => return Ok(Err(e)),
            };
            if let Some(row) = row {
                tx.prepare_cached(
                    "INSERT INTO tenant_payment (tenant, row) VALUES (?1, ?2) \
                     ON CONFLICT (tenant) DO UPDATE SET row = excluded.row",
                )?
                .execute(params![call.tenant().as_str(), row])?;
            }
            Ok(Ok(answer))
        })
        .await?
    }

    async fn counters(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
    ) -> Result<Vec<crate::store::QuotaCounter>, StoreError> {
        let (tenant, meter) = (tenant.clone(), meter.clone());
        self.read(move |tx| {
            let rows: Vec<(String, i64, i64, i64, Option<i64>)> = tx
                .prepare_cached(
                    "SELECT period, start, end, reserved, granted FROM quota WHERE tenant = ?1 AND meter = ?2 \
                     ORDER BY start",
                )?
                .query_map(params![tenant.as_str(), meter.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Sql<_>>()?;
            let cap = stored_cap(tx, &tenant, &meter)?;
            let mut out = Vec::new();
            for (tag, start, end, reserved, granted) in rows {
                let Some(key) = QuotaKey::from_tag(tenant.clone(), meter.clone(), &tag, start, end) else { continue };
                let kept = crate::store::quota::kept_of(keepings(tx, &key, &tag)?.iter().map(|(_, k)| k));
                out.push(
                    crate::store::QuotaCounter::new(key, uint(reserved), granted.map(uint)).with_cap(cap).keeping(kept),
                );
            }
            crate::store::quota::recharge_listed(&mut out, &tenant, &meter, stored_recharge(tx, &tenant, &meter)?);
            Ok(out)
        })
        .await
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "SELECT {CREDIT_COLUMNS} FROM credit \
                 WHERE closed_at IS NULL AND expires_at IS NOT NULL AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
            ))?
            .query_map(params![now, int(limit as u64)], credit_row)?
            .collect()
        })
        .await
    }
}

/// Drops the closed grants of `(t, m)` kept long enough at `now` (`CreditGrant::kept_until`:
/// those closed used up longer).
fn prune_closed(tx: &Transaction<'_>, t: &str, m: &str, now: i64) -> Sql<()> {
    tx.prepare_cached(
        "DELETE FROM credit WHERE tenant = ?1 AND meter = ?2 AND closed_at <= ?3 AND (closed_at <= ?4 \
         OR revoked OR lost > 0 OR (expires_at IS NOT NULL AND closed_at >= expires_at))",
    )?
    .execute(params![t, m, now - contract::CLOSED_GRANTS_KEPT_SECS, now - contract::USED_UP_GRANTS_KEPT_SECS])?;
    Ok(())
}

/// The key of `(tenant, meter)`'s prepaid balance.
fn prepaid_key(tenant: &TenantId, meter: &MeterId) -> QuotaKey {
    let (start, end) = crate::base::Period::Prepaid.bounds(0);
    QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Prepaid, start, end)
}

/// Applies `refund` to its open grant of `(tenant, meter)`: its answer, `Err` with the answer
/// when it changes nothing.
fn apply_refund(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    meter: &MeterId,
    refund: &CreditRefund,
) -> Sql<Result<RefundOutcome, RefundOutcome>> {
    let b = Balance::read(tx, tenant, meter)?;
    // The open grants, and the closed ones a refund still reaches.
    let reach: Vec<CreditGrant> =
        grants_of(tx, tenant.as_str(), meter.as_str())?.into_iter().filter(CreditGrant::refundable).collect();
    let applied = match refund_against(&reach, refund, b.now) {
        Ok(applied) => applied,
        Err(outcome) => return Ok(Err(outcome)),
    };
    b.write(tx, applied.after, applied.used, refund.at)?;
    let g = &applied.grant;
    tx.prepare_cached(
        "UPDATE credit SET bought = coalesce(bought, ?6), units = ?4, taken = ?5, takes = ?7 \
         WHERE tenant = ?1 AND meter = ?2 AND id = ?3",
    )?
    .execute(params![
        tenant.as_str(),
        meter.as_str(),
        g.id,
        int(g.units),
        int(g.taken),
        int(g.bought),
        takes_json(&g.takes)
    ])?;
    Ok(Ok(applied.outcome()))
}

/// Keeps a refund whose grant has not landed (the newer copy of one payment's refund wins).
fn keep_refund(tx: &Transaction<'_>, refund: &CreditRefund) -> Sql<RefundOutcome> {
    tx.prepare_cached("DELETE FROM credit_refund_kept WHERE at < ?1")?
        .execute([refund.at - contract::REFUNDS_KEPT_SECS])?;
    let before: Option<String> = tx
        .prepare_cached("SELECT refund FROM credit_refund_kept WHERE payment = ?1")?
        .query_row([&refund.payment], |r| r.get(0))
        .optional()?;
    let kept = match before.as_deref().and_then(kept_refund_of) {
        Some(before) => newer_refund(before, refund.clone()),
        None => {
            let n: i64 = tx.prepare_cached("SELECT count(*) FROM credit_refund_kept")?.query_row([], |r| r.get(0))?;
            if uint(n) >= contract::REFUNDS_KEPT_MAX as u64 {
                return Ok(RefundOutcome::Full);
            }
            refund.clone()
        }
    };
    tx.prepare_cached(
        "INSERT INTO credit_refund_kept (payment, invoice, refund, at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (payment) DO UPDATE SET invoice = excluded.invoice, refund = excluded.refund, at = excluded.at",
    )?
    .execute(params![kept.payment, kept.invoice, kept_refund_json(&kept), kept.at])?;
    Ok(RefundOutcome::Kept)
}

/// A prepaid balance's forgiven units, until when they hold, and per sender.
fn forgiven_of(tx: &Transaction<'_>, key: &QuotaKey, period: &str) -> Sql<(u64, i64, ForgivenBy)> {
    tx.prepare_cached(
        "SELECT forgiven, forgiven_until, forgiven_by FROM quota \
         WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
    )?
    .query_row(params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end], |r| {
        Ok((uint(r.get(0)?), r.get(1)?, forgiven_by_of(&r.get::<_, String>(2)?)))
    })
}

/// The sequence number of `token`'s sender's last call on the counter, if remembered.
fn last_seq(tx: &Transaction<'_>, key: &QuotaKey, period: &str, token: ReserveToken) -> Sql<Option<u64>> {
    tx.prepare_cached(
        "SELECT seq FROM quota_sender \
         WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 AND node = ?6",
    )?
    .query_row(
        params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end, node_int(token.node)],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|seq| seq.map(uint))
}

/// A prepaid balance as a close or a refund reads it, in its write transaction: its counter
/// and its open grants.
struct Balance {
    key: QuotaKey,
    period: String,
    now: CreditBalance,
    by: ForgivenBy,
    open: Vec<CreditGrant>,
}

impl Balance {
    fn read(tx: &Transaction<'_>, tenant: &TenantId, meter: &MeterId) -> Sql<Self> {
        let open = grants_of(tx, tenant.as_str(), meter.as_str())?.into_iter().filter(|g| g.closed.is_none()).collect();
        let key = prepaid_key(tenant, meter);
        let period = key.period_tag();
        let (reserved, granted) = counter(tx, &key, &period)?.expect("the prepaid period never ends");
        let (forgiven, until, by) = forgiven_of(tx, &key, &period)?;
        let now = CreditBalance::new(granted.unwrap_or(0), uint(reserved)).forgiving(forgiven, until);
        Ok(Self { now, by, key, period, open })
    }

    /// Writes `after`, forgiving the units of `used` that the senders' last leases hold.
    fn write(self, tx: &Transaction<'_>, after: CreditBalance, used: UsedTaken, now: i64) -> Sql<()> {
        let k = &self.key;
        let senders: Vec<SenderCall> = tx
            .prepare_cached(
                "SELECT node, seq, granted, reserved FROM quota_sender \
                 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
            )?
            .query_map(params![k.tenant.as_str(), k.meter.as_str(), self.period, k.start, k.end], |r| {
                Ok((r.get::<_, i64>(0)?.to_string(), uint(r.get(1)?), uint(r.get(2)?), uint(r.get(3)?)))
            })?
            .collect::<Sql<_>>()?;
        let (after, by) = forgive(self.now, after, self.by, used, &senders, now);
        set_balance(tx, k, &self.period, after.granted, after.reserved)?;
        tx.prepare_cached(
            "UPDATE quota SET forgiven = ?6, forgiven_until = ?7, forgiven_by = ?8 \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
        )?
        .execute(params![
            k.tenant.as_str(),
            k.meter.as_str(),
            self.period,
            k.start,
            k.end,
            int(after.forgiven),
            after.forgiven_until,
            forgiven_by_json(&by)
        ])?;
        Ok(())
    }
}

/// Sets a prepaid balance's granted and reserved units.
fn set_balance(tx: &Transaction<'_>, key: &QuotaKey, period: &str, granted: u64, reserved: u64) -> Sql<()> {
    tx.prepare_cached(
        "UPDATE quota SET granted = ?6, reserved = ?7 \
         WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
    )?
    .execute(params![
        key.tenant.as_str(),
        key.meter.as_str(),
        period,
        key.start,
        key.end,
        int(granted),
        int(reserved)
    ])?;
    Ok(())
}

const CREDIT_COLUMNS: &str = "tenant, meter, id, units, granted_at, expires_at, payment, closed_at, revoked, lost, \
     refunded, paid, bought, taken, duplicate, takes";

fn credit_row(r: &rusqlite::Row<'_>) -> Sql<CreditGrant> {
    let (tenant, meter, id): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
    let mut g = CreditGrant::new(tenant.into(), meter.into(), id, uint(r.get(3)?), r.get(4)?).expiring(r.get(5)?);
    g.payment = r.get(6)?;
    g.refunded = uint(r.get(10)?);
    g.paid = r.get::<_, Option<i64>>(11)?.map(uint);
    // Written before the units bought were recorded (or by such a node): its units then.
    g.bought = r.get::<_, Option<i64>>(12)?.map_or(g.units, uint);
    g.taken = uint(r.get(13)?);
    g.duplicate = r.get::<_, i64>(14)? != 0;
    g.takes = takes_of(&r.get::<_, String>(15)?);
    let closed_at: Option<i64> = r.get(7)?;
    if let Some(at) = closed_at {
        let revoked: Option<bool> = r.get(8)?;
        let lost: Option<i64> = r.get(9)?;
        g.closed = Some(CreditClosure { at, revoked: revoked.unwrap_or(false), lost: uint(lost.unwrap_or(0)) });
    }
    Ok(g)
}

/// The grants of (tenant, meter), open and closed.
fn grants_of(tx: &Transaction<'_>, tenant: &str, meter: &str) -> Sql<Vec<CreditGrant>> {
    tx.prepare_cached(&format!("SELECT {CREDIT_COLUMNS} FROM credit WHERE tenant = ?1 AND meter = ?2"))?
        .query_map(params![tenant, meter], credit_row)?
        .collect()
}

/// One release of a batch, in the batch's transaction.
fn release_one(tx: &Transaction<'_>, r: &Release) -> Sql<()> {
    let (key, token) = (&r.key, r.token);
    let period = key.period_tag();
    let Some((reserved, granted)) = counter(tx, key, &period)? else { return Ok(()) };
    if seen(tx, key, &period, token, reserved)?.is_some() {
        return Ok(());
    }
    // What it kept before the release: what it keeps after, and what it gives back.
    let before = Kept { lease: r.kept.lease.saturating_add(r.units), ..r.kept };
    let (reserved, dropped, expired) = expire_for(tx, key, &period, token, uint(reserved), before)?;
    let (after, kept) = if expired {
        // Given back at its expiry already: not again.
        (reserved, dropped)
    } else if granted.is_some() {
        // A prepaid balance draws on what is forgiven to this sender first.
        let (forgiven, until, mut by) = forgiven_of(tx, key, &period)?;
        let last = last_seq(tx, key, &period, token)?;
        let sender = node_int(token.node).to_string();
        let (after, left) = release_against(reserved, forgiven, until, &mut by, (&sender, last), r.units, token.at);
        if left != forgiven {
            set_forgiven(tx, key, &period, left, &by)?;
        }
        (after, r.kept)
    } else {
        (reserved.saturating_sub(r.units), r.kept)
    };
    let grant = Grant::new(0, after).with_expired(expired);
    applied(tx, key, &period, token, grant, Keeping::after(kept, 0, 0, r.expires_at), false)?;
    Ok(())
}

/// Stores a prepaid balance's forgiven units, `left` in all, `by` per sender.
fn set_forgiven(tx: &Transaction<'_>, key: &QuotaKey, period: &str, left: u64, by: &ForgivenBy) -> Sql<()> {
    tx.prepare_cached(
        "UPDATE quota SET forgiven = ?6, forgiven_by = ?7 \
         WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
    )?
    .execute(params![
        key.tenant.as_str(),
        key.meter.as_str(),
        period,
        key.start,
        key.end,
        int(left),
        forgiven_by_json(by)
    ])?;
    Ok(())
}

/// The reservations of the counter's senders, by node.
fn keepings(tx: &Transaction<'_>, key: &QuotaKey, period: &str) -> Sql<Vec<(i64, Keeping)>> {
    tx.prepare_cached(
        "SELECT node, lease, held, jobs, expires_at, gone FROM quota_sender \
         WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
    )?
    .query_map(params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            Keeping {
                kept: Kept::new(uint(r.get(1)?), uint(r.get(2)?), uint(r.get(3)?)),
                expires_at: r.get(4)?,
                gone: uint(r.get(5)?),
            },
        ))
    })?
    .collect()
}

/// Expires the reservations of other senders whose time has come (`store::quota::expire`),
/// and takes the caller's call by what the counter remembers of it (`store::quota::standing`):
/// the counter's reserved units after them, what the caller keeps before its call, and whether
/// its reservation had been given back.
fn expire_for(
    tx: &Transaction<'_>,
    key: &QuotaKey,
    period: &str,
    token: ReserveToken,
    reserved: u64,
    kept: Kept,
) -> Sql<(u64, Kept, bool)> {
    let mut all = keepings(tx, key, period)?;
    let before: Vec<u64> = all.iter().map(|(_, k)| k.gone).collect();
    let reserved = if key.period == crate::base::Period::Prepaid {
        // A prepaid balance: each expiry draws first on what is forgiven to its sender.
        let (forgiven, until, mut by) = forgiven_of(tx, key, period)?;
        let seqs: std::collections::HashMap<i64, i64> = tx
            .prepare_cached(
                "SELECT node, seq FROM quota_sender \
                 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
            )?
            .query_map(params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Sql<_>>()?;
        let senders = all.iter_mut().map(|(n, k)| (n.to_string(), uint(seqs.get(n).copied().unwrap_or(0)), k));
        let by_before = by.clone();
        let (after, left) = expire_against(senders, token.at, (reserved, forgiven, until), &mut by);
        if left != forgiven || by != by_before {
            set_forgiven(tx, key, period, left, &by)?;
        }
        after
    } else {
        reserved.saturating_sub(expire(all.iter_mut().map(|(_, k)| k), token.at))
    };
    if all.iter().zip(&before).any(|((_, k), b)| k.gone != *b) {
        for (node, k) in all.iter().filter(|(_, k)| k.gone > 0) {
            tx.prepare_cached(
                "UPDATE quota_sender SET lease = 0, held = 0, jobs = 0, gone = ?7 \
                 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 AND node = ?6",
            )?
            .execute(params![
                key.tenant.as_str(),
                key.meter.as_str(),
                period,
                key.start,
                key.end,
                node,
                int(k.gone)
            ])?;
        }
    }
    let own = all.iter().find(|(n, _)| *n == node_int(token.node)).map(|(_, k)| *k);
    let mark = match own {
        Some(_) => tx
            .prepare_cached(
                "SELECT gone FROM quota_sender \
                 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 AND node = ?6",
            )?
            .query_row(
                params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end, node_int(token.node)],
                |r| r.get::<_, i64>(0),
            )?
            .min(0),
        None => mark::NONE,
    };
    Ok(match standing(own.as_ref(), mark, kept) {
        Some((owed, dropped)) => (reserved.saturating_add(owed), dropped, true),
        None => (reserved, kept, false),
    })
}

/// The counter of `key`'s reserved units, with its granted units if it is a prepaid balance,
/// created if its period is still of use (dropping the periods of the same tenant and meter
/// that ended before it started); `None` for a period already dropped.
fn counter(tx: &Transaction<'_>, key: &QuotaKey, period: &str) -> Sql<Option<(i64, Option<u64>)>> {
    let (t, m) = (key.tenant.as_str(), key.meter.as_str());
    let floor: Option<i64> = tx
        .prepare_cached("SELECT dropped_before FROM quota_floor WHERE tenant = ?1 AND meter = ?2")?
        .query_row(params![t, m], |r| r.get(0))
        .optional()?;
    if floor.is_some_and(|f| key.end <= f) {
        return Ok(None);
    }
    let found: Option<(i64, Option<i64>)> = tx
        .prepare_cached(
            "SELECT reserved, granted FROM quota \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
        )?
        .query_row(params![t, m, period, key.start, key.end], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((reserved, granted)) = found {
        return Ok(Some((reserved, granted.map(uint))));
    }
    // A prepaid balance ends nothing: the calendar periods beside it stay.
    let prepaid = key.period == crate::base::Period::Prepaid;
    let ended: Option<i64> = if prepaid {
        None
    } else {
        tx.prepare_cached("SELECT max(end) FROM quota WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
            .query_row(params![t, m, key.drops_ended_before()], |r| r.get(0))?
    };
    if let Some(ended) = ended {
        tx.prepare_cached("DELETE FROM quota WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?.execute(params![
            t,
            m,
            key.drops_ended_before()
        ])?;
        tx.prepare_cached("DELETE FROM quota_sender WHERE tenant = ?1 AND meter = ?2 AND end < ?3")?
            .execute(params![t, m, key.drops_ended_before()])?;
        tx.prepare_cached(
            "INSERT INTO quota_floor (tenant, meter, dropped_before) VALUES (?1, ?2, ?3) \
             ON CONFLICT (tenant, meter) DO UPDATE SET dropped_before = max(dropped_before, excluded.dropped_before)",
        )?
        .execute(params![t, m, ended])?;
    }
    let granted = (key.period == crate::base::Period::Prepaid).then_some(0i64);
    tx.prepare_cached(
        "INSERT INTO quota (tenant, meter, period, start, end, reserved, granted) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)",
    )?
    .execute(params![t, m, period, key.start, key.end, granted])?;
    Ok(Some((0, granted.map(uint))))
}

/// Whether the call with `token` was applied already: `Some(grant)` answers it again.
fn seen(tx: &Transaction<'_>, key: &QuotaKey, period: &str, token: ReserveToken, reserved: i64) -> Sql<Option<Grant>> {
    let last: Option<(i64, i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT seq, granted, reserved, gone FROM quota_sender \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 AND node = ?6",
        )?
        .query_row(
            params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end, node_int(token.node)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)?)),
        )
        .optional()?;
    let seq = int(token.seq);
    Ok(match last {
        Some((last, granted, then, gone)) if seq <= last => Some(if seq == last {
            // Answered as it was, an expiry told included.
            Grant::new(uint(granted), uint(then)).with_expired(gone == mark::TOLD)
        } else {
            Grant::new(0, uint(reserved))
        }),
        Some(_) => None,
        None => {
            let forgotten_at: i64 = tx
                .prepare_cached(
                    "SELECT senders_forgotten_at FROM quota \
                     WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
                )?
                .query_row(params![key.tenant.as_str(), key.meter.as_str(), period, key.start, key.end], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            forgotten(token.at, forgotten_at).then(|| Grant::new(0, uint(reserved)))
        }
    })
}

/// Sets the counter and records the answer to `token`'s call with the reservation its sender
/// keeps (keeping the newest senders): the answer, with the units used.
fn applied(
    tx: &Transaction<'_>,
    key: &QuotaKey,
    period: &str,
    token: ReserveToken,
    grant: Grant,
    keeping: Keeping,
    answered: bool,
) -> Sql<Grant> {
    let (t, m) = (key.tenant.as_str(), key.meter.as_str());
    tx.prepare_cached(
        "UPDATE quota SET reserved = ?6 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
    )?
    .execute(params![t, m, period, key.start, key.end, int(grant.reserved)])?;
    let kept: i64 = tx
        .prepare_cached(
            "SELECT coalesce(sum(lease + held + jobs), 0) FROM quota_sender \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 AND node != ?6",
        )?
        .query_row(params![t, m, period, key.start, key.end, node_int(token.node)], |r| r.get(0))?;
    let grant = grant.with_used(grant.reserved.saturating_sub(uint(kept).saturating_add(keeping.kept.total())));
    tx.prepare_cached(
        "INSERT INTO quota_sender (tenant, meter, period, start, end, node, seq, granted, reserved, at, \
         lease, held, jobs, expires_at, gone) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
         ON CONFLICT (tenant, meter, period, start, end, node) \
         DO UPDATE SET seq = excluded.seq, granted = excluded.granted, reserved = excluded.reserved, \
         at = max(at, excluded.at), lease = excluded.lease, held = excluded.held, jobs = excluded.jobs, \
         expires_at = excluded.expires_at, gone = excluded.gone",
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
        int(grant.reserved),
        token.at,
        int(keeping.kept.lease),
        int(keeping.kept.held),
        int(keeping.kept.jobs),
        keeping.expires_at,
        mark_after(grant.expired, answered)
    ])?;
    // Senders are forgotten by the time of their last call, oldest first, never one that
    // called within the quiet window (its retry may still come) nor one whose reservation is
    // live (it expires first); the latest time forgotten is kept (`store::quota::forgotten`).
    let forgotten: Option<i64> = tx
        .prepare_cached(
            "DELETE FROM quota_sender WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 \
             AND at < ?7 AND NOT (gone <= 0 AND lease + held > 0 AND expires_at > 0) AND NOT (jobs > 0 AND at >= ?8) \
             AND node NOT IN (SELECT node FROM quota_sender \
                 WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5 \
                 ORDER BY at DESC, node LIMIT ?6) RETURNING at",
        )?
        .query_map(
            params![
                t,
                m,
                period,
                key.start,
                key.end,
                int(contract::SENDERS_KEPT as u64),
                token.at.saturating_sub(contract::SENDER_QUIET_SECS),
                token.at.saturating_sub(contract::SENDER_JOBS_KEPT_SECS)
            ],
            |r| r.get::<_, i64>(0),
        )?
        .try_fold(None, |most: Option<i64>, at| at.map(|at| Some(most.map_or(at, |m| m.max(at)))))?;
    if let Some(at) = forgotten {
        tx.prepare_cached(
            "UPDATE quota SET senders_forgotten_at = max(senders_forgotten_at, ?6) \
             WHERE tenant = ?1 AND meter = ?2 AND period = ?3 AND start = ?4 AND end = ?5",
        )?
        .execute(params![t, m, period, key.start, key.end, at])?;
    }
    Ok(grant)
}

/// The tenant's own cap on the reservation's meter, as its [`CapMode`] reads or sets it (in
/// the reservation's transaction).
fn cap_of(tx: &Transaction<'_>, r: &Reservation) -> Sql<Option<SpendCap>> {
    let (t, m) = (r.key.tenant.as_str(), r.key.meter.as_str());
    match r.cap {
        CapMode::Ignored => Ok(None),
        CapMode::Stored => stored_cap(tx, &r.key.tenant, &r.key.meter),
        CapMode::Set(Some(cap)) => {
            tx.prepare_cached(
                "INSERT INTO quota_cap (tenant, meter, cap, hard) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tenant, meter) DO UPDATE SET cap = excluded.cap, hard = excluded.hard",
            )?
            .execute(params![t, m, int(cap.limit), cap.hard])?;
            Ok(Some(cap))
        }
        CapMode::Set(None) => {
            tx.prepare_cached("DELETE FROM quota_cap WHERE tenant = ?1 AND meter = ?2")?.execute(params![t, m])?;
            Ok(None)
        }
    }
}

/// The tenant's recharge of `(tenant, meter)`, if it ever set one.
fn stored_recharge(tx: &Transaction<'_>, tenant: &TenantId, meter: &MeterId) -> Sql<Option<RechargeState>> {
    tx.prepare_cached("SELECT state FROM quota_recharge WHERE tenant = ?1 AND meter = ?2")?
        .query_row(params![tenant.as_str(), meter.as_str()], |row| row.get::<_, String>(0))
        .optional()?
        .map(|s| {
            RechargeState::of_json(&s)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
        })
        .transpose()
}

/// The balance of `(tenant, meter)` (granted − reserved), if it has a counter.
fn prepaid_balance(tx: &Transaction<'_>, tenant: &TenantId, meter: &MeterId) -> Sql<Option<i64>> {
    let (start, end) = crate::base::Period::Prepaid.bounds(0);
    let period = crate::base::Period::Prepaid.name();
    let row: Option<(i64, Option<i64>)> = tx
        .prepare_cached(
            "SELECT reserved, granted FROM quota WHERE tenant = ?1 AND meter = ?2 AND period = ?3 \
             AND start = ?4 AND end = ?5",
        )?
        .query_row(params![tenant.as_str(), meter.as_str(), period, start, end], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.and_then(|(reserved, granted)| granted.map(|g| g.saturating_sub(reserved))))
}

/// The cap stored for `(tenant, meter)`, if any.
fn stored_cap(tx: &Transaction<'_>, tenant: &TenantId, meter: &MeterId) -> Sql<Option<SpendCap>> {
    tx.prepare_cached("SELECT cap, hard FROM quota_cap WHERE tenant = ?1 AND meter = ?2")?
        .query_row(params![tenant.as_str(), meter.as_str()], |r| {
            Ok(SpendCap::new(uint(r.get::<_, i64>(0)?), r.get::<_, bool>(1)?))
        })
        .optional()
}
