//! The quota role of the DynamoStore.

use super::*;
use crate::{
    base::{MeterId, Period},
    store::{
        contract,
        quota::{
            close_against, fits, forgive, forgiven_by_json, forgiven_by_of, forgotten, kept_refund_json,
            kept_refund_of, newer_refund, refund_against, release_against, CreditRefund, ForgivenBy, SenderCall,
        },
        CapMode, CreditBalance, CreditClosure, CreditGrant, GrantOutcome, QuotaCounter, RefundOutcome, SpendCap,
    },
};

/// The sort key of a tenant's own cap on a meter, in the partition of the meter's counters
/// (it has no `end`: dropping ended periods never takes it).
pub(super) const CAP_SK: &str = "CAP";

/// A cap item read back.
pub(super) fn cap_of(item: &Item) -> Option<SpendCap> {
    let hard = item.get("hard")?.as_bool().ok().copied()?;
    Some(SpendCap::new(get_u(item, "cap"), hard))
}

#[async_trait]
impl QuotaStore for DynamoStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        if r.cap != CapMode::Ignored {
            // The tenant's own cap, an item beside the meter's counters: set (or read) first,
            // then the counter's conditional write holds the call to it. A reserve racing a
            // change of the cap is held to the cap as it was read, as a lease taken just
            // before the change would be.
            let cap = self.cap_for(r).await?;
            let mut held = r.clone();
            held.limit = r.limit_under(cap);
            held.cap = CapMode::Ignored;
            return Box::pin(self.reserve(&held)).await.map(|g| g.with_cap(cap));
        }
        if r.key.period == Period::Prepaid {
            return self.reserve_prepaid(r).await;
        }
        // First as if the counter allowed everything asked (one conditional ADD); when the limit
        // refuses, the counter as it was says how much is left, and what the rule grants for
        // that is asked for (`Reservation::grant_for`: near the limit, an eighth of what is
        // left), on the condition that at least as much is still left.
        let within = |left: u64| match r.limit {
            Some(_) => r.grant_for(left),
            None => r.units,
        };
        let mut units = within(r.limit.map_or(u64::MAX, |l| l.saturating_sub(r.owed)));
        for attempt in 0..ATTEMPTS {
            let at_most = match r.limit {
                Some(l) if units > 0 => Some(int(l.saturating_sub(r.owed).saturating_sub(r.left_needed(units)))),
                _ => None,
            };
            let delta = int(r.owed.saturating_add(units));
            match self.add(&r.key, delta, units, at_most, None, r.token).await? {
                Ok((reserved, _)) => return Ok(Grant::new(units, reserved)),
                Err(None) => {
                    if !self.ensure_counter(&r.key).await? {
                        // A late call for a period long over: nothing is left to reserve in it.
                        return Ok(Grant::new(0, 0));
                    }
                }
                Err(Some(item)) => {
                    if let Some(grant) = Self::seen(&item, r.token) {
                        return Ok(grant);
                    }
                    let reserved = get_u(&item, "reserved");
                    let left = r.limit.map_or(u64::MAX, |l| l.saturating_sub(reserved.saturating_add(r.owed)));
                    units = within(left);
                    if attempt > 2 {
                        backoff(attempt).await;
                    }
                }
            }
        }
        Err(StoreError::Conflict("a quota counter changed under every attempt"))
    }

    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        if key.period == Period::Prepaid {
            return self.release_prepaid(key, units, token).await;
        }
        // Never below zero: at most what the counter holds is given back.
        let mut units = units;
        for _ in 0..ATTEMPTS {
            match self.add(key, -int(units), 0, None, Some(int(units)), token).await? {
                Ok(_) => return Ok(()),
                Err(None) => {
                    if !self.ensure_counter(key).await? {
                        return Ok(());
                    }
                }
                Err(Some(item)) => {
                    if Self::seen(&item, token).is_some() {
                        return Ok(());
                    }
                    units = units.min(get_u(&item, "reserved"));
                }
            }
        }
        Err(StoreError::Conflict("a quota counter changed under every attempt"))
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        let key = prepaid_key(&grant.tenant, &grant.meter);
        if !fits(0, grant.units) {
            return Ok(GrantOutcome::TooLarge);
        }
        if !self.ensure_counter(&key).await? {
            return Err(StoreError::Conflict("the prepaid counter"));
        }
        let pk = credit_pk(&grant.tenant);
        let sk = credit_sk(grant.meter.as_str(), &grant.id);
        let payment = grant.payment.as_deref().unwrap_or(&grant.id);
        for attempt in 0..ATTEMPTS {
            // One grant per id on every meter of the tenant, and one per payment.
            if let Some(seen) = self.granted_before(grant).await? {
                // A refund kept for it is applied now (a crash between the grant and its
                // refund's application is repaired by Stripe's redelivery of the grant).
                self.apply_kept_refunds(&seen, payment).await?;
                return Ok(GrantOutcome::Duplicate(seen));
            }
            if self.open_grants(&grant.tenant, &grant.meter).await?.len() >= contract::OPEN_GRANTS_MAX {
                return Ok(GrantOutcome::TooMany);
            }
            // Refunds kept for this payment: the transaction holds only if they are as read.
            let kept_keys = kept_keys(payment, &grant.id);
            let mut kept = Vec::new();
            for k in &kept_keys {
                kept.push(self.get(kept_refund_pk(k), ONE_SK).await?);
            }
            // A refund kept for it is applied in the grant's own transaction: the grant lands
            // with those units taken back, and the balance as read is set (by the rule every
            // store refunds by); without one, its units are added to the balance.
            let refund = kept
                .iter()
                .flatten()
                .filter_map(|item| get_s(item, "refund").and_then(kept_refund_of))
                .reduce(newer_refund)
                .map(|r| r.landing(grant));
            let mut landed = grant.clone();
            landed.bought = grant.units;
            landed.taken = 0;
            landed.closed = None;
            let mut balance_write = None;
            if let Some(refund) = &refund {
                let Some((before, mut open, forgiving)) = self.read_balance(&key).await? else {
                    return Err(StoreError::Conflict("the prepaid counter"));
                };
                if !fits(before.granted, grant.units) {
                    return Ok(GrantOutcome::TooLarge);
                }
                open.retain(|g| g.closed.is_none());
                open.push(landed.clone());
                let with = CreditBalance { granted: before.granted.saturating_add(grant.units), ..before };
                if let Some((_, removed, taken, after, used)) = refund_against(&open, refund, with) {
                    let (after, by) = forgive(before, after, forgiving.0, used, &forgiving.1, refund.at);
                    landed.units -= removed;
                    landed.taken = taken;
                    balance_write = Some(self.set_balance(&key, before, after, &by)?);
                }
            }
            let mut put = Put::builder()
                .table_name(&self.table)
                .item("pk", s(pk.clone()))
                .item("sk", s(sk.clone()))
                .item("tenant", s(grant.tenant.as_str()))
                .item("meter", s(grant.meter.as_str()))
                .item("id", s(grant.id.as_str()))
                .item("units", n(landed.units))
                .item("bought", n(grant.units))
                .item("taken", n(landed.taken))
                .item("granted_at", n(grant.granted_at))
                .condition_expression("attribute_not_exists(pk)");
            if let Some(at) = grant.expires_at {
                put = put
                    .item("expires_at", n(at))
                    .item("gpk", s(CREDIT_DUE_GPK))
                    .item("gsk", s(format!("{}{SEP}{pk}{SEP}{sk}", window_text(at))));
            }
            if let Some(p) = &grant.payment {
                put = put.item("payment", s(p.as_str()));
            }
            if let Some(paid) = grant.paid {
                put = put.item("paid", n(paid));
            }
            let add = Update::builder()
                .table_name(&self.table)
                .key("pk", s(quota_pk(&key)))
                .key("sk", s(quota_sk(&key)))
                .update_expression("ADD granted :u, room :u")
                // Never past the most a balance holds.
                .condition_expression("attribute_exists(pk) AND granted <= :most")
                .expression_attribute_values(":u", n(grant.units))
                .expression_attribute_values(":most", n(contract::MAX_BALANCE - grant.units));
            let balance_write = match balance_write {
                Some(set) => set,
                None => TransactWriteItem::builder().update(add.build().map_err(backend)?).build(),
            };
            let mut actions =
                vec![TransactWriteItem::builder().put(put.build().map_err(backend)?).build(), balance_write];
            let mut markers = vec![grant_id_pk(&grant.tenant, &grant.id)];
            if let Some(p) = &grant.payment {
                markers.push(payment_pk(p));
            }
            for marker in markers {
                let put = Put::builder()
                    .table_name(&self.table)
                    .item("pk", s(marker))
                    .item("sk", s(ONE_SK))
                    .item("tenant", s(grant.tenant.as_str()))
                    .item("meter", s(grant.meter.as_str()))
                    .item("id", s(grant.id.as_str()))
                    .condition_expression("attribute_not_exists(pk)");
                actions.push(TransactWriteItem::builder().put(put.build().map_err(backend)?).build());
            }
            for (k, item) in kept_keys.iter().zip(&kept) {
                actions.push(unchanged(&self.table, kept_refund_pk(k), item.as_ref())?);
            }
            if self.transact(actions, "a credit grant").await?.is_some() {
                // Granted meanwhile (under its id or payment), a refund kept meanwhile, or the
                // balance would pass its most.
                if self.granted_before(grant).await?.is_some() {
                    continue;
                }
                let now: Vec<Option<Item>> = {
                    let mut v = Vec::new();
                    for k in &kept_keys {
                        v.push(self.get(kept_refund_pk(k), ONE_SK).await?);
                    }
                    v
                };
                if now != kept || refund.is_some() {
                    // (With a refund, the balance is set as read: a reserve meanwhile.)
                    backoff(attempt).await;
                    continue;
                }
                return Ok(GrantOutcome::TooLarge);
            }
            let stored = self.get(pk.clone(), &sk).await?.as_ref().and_then(credit_of);
            if let Some(stored) = stored {
                self.apply_kept_refunds(&stored, payment).await?;
            }
            let counter = self.get(quota_pk(&key), &quota_sk(&key)).await?.unwrap_or_default();
            return Ok(GrantOutcome::Granted(CreditBalance::new(
                get_u(&counter, "granted"),
                get_u(&counter, "reserved"),
            )));
        }
        Err(StoreError::Conflict("a credit grant raced with refunds under every attempt"))
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        let mut grants = self.grants(tenant, meter).await?;
        grants.sort_by(|a, b| (a.meter.as_str(), a.spending_order()).cmp(&(b.meter.as_str(), b.spending_order())));
        let mut meters: Vec<MeterId> = grants.iter().map(|g| g.meter.clone()).collect();
        meters.dedup();
        let mut balances = Vec::with_capacity(meters.len());
        for m in meters {
            let key = prepaid_key(tenant, &m);
            let counter = self.get(quota_pk(&key), &quota_sk(&key)).await?.unwrap_or_default();
            balances.push((m, CreditBalance::new(get_u(&counter, "granted"), get_u(&counter, "reserved"))));
        }
        Ok((grants, balances))
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        let key = prepaid_key(tenant, meter);
        for attempt in 0..ATTEMPTS {
            // The balance first, then its grants: a grant or a close after the read changes the
            // balance, so the condition below refuses a computation over grants read before.
            let Some((balance, all, forgiving)) = self.read_balance(&key).await? else { return Ok(None) };
            let open: Vec<CreditGrant> = all.iter().filter(|g| g.closed.is_none()).cloned().collect();
            let due =
                open.iter().find(|g| g.id == id).is_some_and(|g| revoke || g.expires_at.is_some_and(|at| at <= now));
            if !due {
                return Ok(None);
            }
            let Some((lost, after, used)) = close_against(&open, id, balance) else { return Ok(None) };
            let (after, by) = forgive(balance, after, forgiving.0, used, &forgiving.1, now);
            let payment = open.iter().find(|g| g.id == id).and_then(|g| g.payment.clone());
            let close = Update::builder()
                .table_name(&self.table)
                .key("pk", s(credit_pk(tenant)))
                .key("sk", s(credit_sk(meter.as_str(), id)))
                .update_expression("SET closed_at = :at, revoked = :rv, lost = :lost, #ttl = :ttl REMOVE gpk, gsk")
                .expression_attribute_names("#ttl", "ttl")
                .expression_attribute_values(":ttl", n(now.saturating_add(contract::CLOSED_GRANTS_KEPT_SECS)))
                .condition_expression("attribute_exists(pk) AND attribute_not_exists(closed_at)")
                .expression_attribute_values(":at", n(now))
                .expression_attribute_values(":rv", AttributeValue::Bool(revoke))
                .expression_attribute_values(":lost", n(lost));
            let actions = vec![
                TransactWriteItem::builder().update(close.build().map_err(backend)?).build(),
                self.set_balance(&key, balance, after, &by)?,
            ];
            match self.transact(actions, "a credit grant's closing").await? {
                None => {
                    // Its markers go with it, once it is dropped (best effort: a marker left
                    // names a closed grant, which refunds and grants read as such).
                    let ttl = now.saturating_add(contract::CLOSED_GRANTS_KEPT_SECS);
                    let markers = std::iter::once(grant_id_pk(tenant, id)).chain(payment.as_deref().map(payment_pk));
                    for marker in markers {
                        if let Err(e) = self
                            .client
                            .update_item()
                            .table_name(&self.table)
                            .key("pk", s(marker))
                            .key("sk", s(ONE_SK))
                            .update_expression("SET #ttl = :ttl")
                            .condition_expression("attribute_exists(pk)")
                            .expression_attribute_names("#ttl", "ttl")
                            .expression_attribute_values(":ttl", n(ttl))
                            .send()
                            .await
                        {
                            if !is_ccf(&e) {
                                tracing::debug!(error = %sdk(e), "a closed grant's marker keeps no expiry");
                            }
                        }
                    }
                    // Closed grants are kept a while (their ids, for duplicates), then dropped.
                    for old in
                        all.iter().filter(|g| g.closed.is_some_and(|c| c.at <= now - contract::CLOSED_GRANTS_KEPT_SECS))
                    {
                        let _ = self
                            .client
                            .delete_item()
                            .table_name(&self.table)
                            .key("pk", s(credit_pk(tenant)))
                            .key("sk", s(credit_sk(meter.as_str(), &old.id)))
                            .send()
                            .await;
                    }
                    return Ok(Some(CreditClosure { at: now, revoked: revoke, lost }));
                }
                Some(_) => backoff(attempt).await,
            }
        }
        Err(StoreError::Conflict("a prepaid balance changed under every attempt"))
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        for attempt in 0..ATTEMPTS {
            // The grant of the payment: by its marker, or (a grant made before markers) among
            // the grants of the tenant that paid.
            let mut grant = match self.get(payment_pk(&refund.payment), ONE_SK).await? {
                Some(marker) => match (get_s(&marker, "tenant"), get_s(&marker, "meter"), get_s(&marker, "id")) {
                    (Some(t), Some(m), Some(id)) => {
                        self.get(credit_pk(&t.into()), &credit_sk(m, id)).await?.as_ref().and_then(credit_of)
                    }
                    _ => None,
                },
                None => None,
            };
            if grant.is_none() {
                if let Some(tenant) = &refund.tenant {
                    let all = self.grants(tenant, None).await?;
                    grant = all
                        .iter()
                        .find(|g| g.closed.is_none() && refund.is_of(g))
                        .or_else(|| all.iter().find(|g| refund.is_of(g)))
                        .cloned();
                }
            }
            if let Some(grant) = grant {
                if grant.closed.is_some() {
                    return Ok(RefundOutcome::Nothing);
                }
                return Ok(match self.apply_refund_to(&grant.tenant, &grant.meter, refund).await? {
                    Some((id, units)) => {
                        RefundOutcome::Taken { tenant: grant.tenant, meter: grant.meter, grant: id, units }
                    }
                    None => RefundOutcome::Nothing,
                });
            }
            // No grant yet: kept, on the condition that no grant of the payment landed meanwhile.
            match self.keep_refund(refund).await? {
                Some(outcome) => return Ok(outcome),
                None => backoff(attempt).await,
            }
        }
        Err(StoreError::Conflict("a refund raced with its grant under every attempt"))
    }

    async fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<QuotaCounter>, StoreError> {
        self.quota_counters(tenant, meter).await
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        while out.len() < limit {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("gsi1")
                .key_condition_expression("gpk = :h AND gsk < :upto")
                .expression_attribute_values(":h", s(CREDIT_DUE_GPK))
                .expression_attribute_values(":upto", s(window_text(now.saturating_add(1))))
                .limit(i32::try_from(limit - out.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            out.extend(page.items.unwrap_or_default().iter().filter_map(credit_of).filter(|g| g.closed.is_none()));
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

impl DynamoStore {
    /// A reserve on a prepaid balance: held to the room its grants leave (`room` = granted −
    /// reserved, kept beside them), in one conditional update; first as if the balance allowed
    /// everything asked, then what the rule grants for the room read.
    async fn reserve_prepaid(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let mut units = r.units;
        for attempt in 0..ATTEMPTS {
            let need = (units > 0).then(|| int(r.owed.saturating_add(r.left_needed(units))));
            match self.add(&r.key, int(r.owed.saturating_add(units)), units, need, None, r.token).await? {
                Ok((reserved, granted)) => return Ok(Grant::new(units, reserved).with_limit(granted)),
                Err(None) => {
                    if !self.ensure_counter(&r.key).await? {
                        return Ok(Grant::new(0, 0));
                    }
                }
                Err(Some(item)) => {
                    if let Some(grant) = Self::seen(&item, r.token) {
                        return Ok(grant.with_limit(Some(get_u(&item, "granted"))));
                    }
                    let room = get_i(&item, "room").unwrap_or(0);
                    let left = u64::try_from(room.saturating_sub(int(r.owed))).unwrap_or(0);
                    units = r.grant_for(left);
                    if attempt > 2 {
                        backoff(attempt).await;
                    }
                }
            }
        }
        Err(StoreError::Conflict("a prepaid balance changed under every attempt"))
    }

    /// The grants of `tenant` (on `meter`, or every meter), open and closed.
    async fn grants(&self, tenant: &TenantId, meter: Option<&MeterId>) -> Result<Vec<CreditGrant>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .expression_attribute_values(":pk", s(credit_pk(tenant)))
                .set_exclusive_start_key(start.take());
            q = match meter {
                Some(m) => q
                    .key_condition_expression("pk = :pk AND begins_with(sk, :m)")
                    .expression_attribute_values(":m", s(format!("{m}{SEP}"))),
                None => q.key_condition_expression("pk = :pk"),
            };
            let page = q.send().await.map_err(sdk)?;
            out.extend(page.items.unwrap_or_default().iter().filter_map(credit_of));
            match page.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        Ok(out)
    }

    async fn open_grants(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<CreditGrant>, StoreError> {
        Ok(self.grants(tenant, Some(meter)).await?.into_iter().filter(|g| g.closed.is_none()).collect())
    }
}

/// The key of `(tenant, meter)`'s prepaid balance.
fn prepaid_key(tenant: &TenantId, meter: &MeterId) -> QuotaKey {
    let (start, end) = Period::Prepaid.bounds(0);
    QuotaKey::new(tenant.clone(), meter.clone(), Period::Prepaid, start, end)
}

impl DynamoStore {
    /// A prepaid balance as a close or a refund reads it: its counter first, then its grants
    /// (a grant or a close after the read changes the counter, so a write conditional on the
    /// counter as read refuses a computation over grants read before), with what is forgiven
    /// per sender and the senders' last calls. `None`: no balance.
    async fn read_balance(
        &self,
        key: &QuotaKey,
    ) -> Result<Option<(CreditBalance, Vec<CreditGrant>, (ForgivenBy, Vec<SenderCall>))>, StoreError> {
        let Some(counter) = self.get(quota_pk(key), &quota_sk(key)).await? else { return Ok(None) };
        let balance = CreditBalance::new(get_u(&counter, "granted"), get_u(&counter, "reserved"))
            .forgiving(get_u(&counter, "forgiven"), get_i(&counter, "forgiven_until").unwrap_or(0));
        let by = forgiven_by_of(get_s(&counter, "forgiven_by").unwrap_or("{}"));
        // A sender whose answer is not recorded yet (`r`) names no lease.
        let senders = counter
            .get("senders")
            .and_then(|v| v.as_m().ok())
            .map(|m| {
                m.iter()
                    .filter_map(|(node, rec)| {
                        let rec = rec.as_m().ok()?;
                        rec.get("r")?;
                        Some((node.clone(), get_u(rec, "s"), get_u(rec, "g"), get_u(rec, "r")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some((balance, self.grants(&key.tenant, Some(&key.meter)).await?, (by, senders))))
    }

    /// Sets a balance to `after` (forgiven per sender as `by`), only if it is still `before`
    /// (a reserve or release meanwhile makes the caller read it again).
    fn set_balance(
        &self,
        key: &QuotaKey,
        before: CreditBalance,
        after: CreditBalance,
        by: &ForgivenBy,
    ) -> Result<TransactWriteItem, StoreError> {
        let room = i128::from(after.granted) - i128::from(after.reserved);
        let set = Update::builder()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .update_expression(
                "SET granted = :g, reserved = :r, room = :room, forgiven = :f, forgiven_until = :fu, forgiven_by = :fb",
            )
            .condition_expression(
                "granted = :g0 AND reserved = :r0 AND (attribute_not_exists(forgiven) OR forgiven = :f0)",
            )
            .expression_attribute_values(":f", n(after.forgiven))
            .expression_attribute_values(":fu", n(after.forgiven_until))
            .expression_attribute_values(":fb", s(forgiven_by_json(by)))
            .expression_attribute_values(":f0", n(before.forgiven))
            .expression_attribute_values(":g", n(after.granted))
            .expression_attribute_values(":r", n(after.reserved))
            .expression_attribute_values(":room", AttributeValue::N(room.to_string()))
            .expression_attribute_values(":g0", n(before.granted))
            .expression_attribute_values(":r0", n(before.reserved));
        Ok(TransactWriteItem::builder().update(set.build().map_err(backend)?).build())
    }
}

fn credit_of(item: &Item) -> Option<CreditGrant> {
    let mut g = CreditGrant::new(
        get_s(item, "tenant")?.into(),
        get_s(item, "meter")?.into(),
        get_s(item, "id")?,
        get_u(item, "units"),
        get_i(item, "granted_at")?,
    )
    .expiring(get_i(item, "expires_at"));
    g.payment = get_s(item, "payment").map(str::to_owned);
    g.refunded = get_u(item, "refunded");
    g.paid = item.contains_key("paid").then(|| get_u(item, "paid"));
    // Written before the units bought were recorded: its units then.
    g.bought = if item.contains_key("bought") { get_u(item, "bought") } else { g.units };
    g.taken = get_u(item, "taken");
    if let Some(at) = get_i(item, "closed_at") {
        let revoked = item.get("revoked").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
        g.closed = Some(CreditClosure { at, revoked, lost: get_u(item, "lost") });
    }
    Some(g)
}

impl DynamoStore {
    /// The tenant's own cap on the reservation's meter, as its [`CapMode`] sets or reads it:
    /// the item `CAP` in the partition of the meter's counters.
    async fn cap_for(&self, r: &Reservation) -> Result<Option<SpendCap>, StoreError> {
        let pk = quota_pk(&r.key);
        match r.cap {
            CapMode::Ignored => Ok(None),
            CapMode::Stored => Ok(self.get(pk, CAP_SK).await?.as_ref().and_then(cap_of)),
            CapMode::Set(Some(cap)) => {
                self.client
                    .put_item()
                    .table_name(&self.table)
                    .item("pk", s(pk))
                    .item("sk", s(CAP_SK))
                    .item("cap", n(int(cap.limit)))
                    .item("hard", AttributeValue::Bool(cap.hard))
                    .send()
                    .await
                    .map_err(sdk)?;
                Ok(Some(cap))
            }
            CapMode::Set(None) => {
                self.client
                    .delete_item()
                    .table_name(&self.table)
                    .key("pk", s(pk))
                    .key("sk", s(CAP_SK))
                    .send()
                    .await
                    .map_err(sdk)?;
                Ok(None)
            }
        }
    }

    /// The counter of `key` exists (created now if its period is still of use, dropping the
    /// periods of the same tenant and meter that ended before it started); `false` for a
    /// period already dropped.
    pub(super) async fn ensure_counter(&self, key: &QuotaKey) -> Result<bool, StoreError> {
        let pk = quota_pk(key);
        let items = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(pk.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk)?
            .items
            .unwrap_or_default();
        let sk = quota_sk(key);
        let floor = items.iter().find(|i| get_s(i, "sk") == Some("FLOOR")).and_then(|i| get_i(i, "dropped_before"));
        if floor.is_some_and(|f| key.end <= f) {
            return Ok(false);
        }
        if items.iter().any(|i| get_s(i, "sk") == Some(sk.as_str())) {
            return Ok(true);
        }
        let mut ended = None;
        // A prepaid balance ends nothing: the calendar periods beside it stay.
        let ends_others = key.period != Period::Prepaid;
        for old in items.iter().filter(|i| ends_others && get_s(i, "sk") != Some("FLOOR")) {
            let end = get_i(old, "end").unwrap_or(i64::MAX);
            if end < key.start {
                ended = ended.max(Some(end));
                if let Some(old_sk) = get_s(old, "sk") {
                    self.client
                        .delete_item()
                        .table_name(&self.table)
                        .key("pk", s(pk.clone()))
                        .key("sk", s(old_sk))
                        .send()
                        .await
                        .map_err(sdk)?;
                }
            }
        }
        if let Some(ended) = ended {
            let floor = floor.unwrap_or(i64::MIN).max(ended);
            self.client
                .put_item()
                .table_name(&self.table)
                .item("pk", s(pk.clone()))
                .item("sk", s("FLOOR"))
                .item("dropped_before", n(floor))
                .item("ttl", n(floor.saturating_add(RETENTION_SECS)))
                .send()
                .await
                .map_err(sdk)?;
        }
        let mut put = self.client.put_item();
        if key.period == Period::Prepaid {
            // A prepaid balance: its granted units, and the room left (granted − reserved) that
            // a reserve's condition reads (conditions cannot add).
            put = put.item("granted", n(0)).item("room", n(0));
        }
        let created = put
            .table_name(&self.table)
            .item("pk", s(pk))
            .item("sk", s(sk))
            .item("reserved", n(0))
            .item("senders", AttributeValue::M(HashMap::new()))
            .item("end", n(key.end))
            .item("ttl", n(key.end.saturating_add(RETENTION_SECS)))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(e) if is_ccf(&e) => Ok(true),
            Err(e) => Err(sdk(e)),
        }
    }

    /// Adds `delta` (positive or negative) to the counter of `key` for `token`'s call, at most
    /// once per token, and only if the counter stays at or under `at_most` (when given; for a
    /// prepaid balance, `at_most` is the room that must be left before the call). Returns the
    /// counter after the call with a prepaid balance's granted units, or what the counter item
    /// held when a condition failed (`Err(Some(item))`), or `Err(None)` when the counter does
    /// not exist.
    pub(super) async fn add(
        &self,
        key: &QuotaKey,
        delta: i64,
        granted: u64,
        at_most: Option<i64>,
        at_least: Option<i64>,
        token: ReserveToken,
    ) -> Result<Result<(u64, Option<u64>), Option<Item>>, StoreError> {
        let prepaid = key.period == Period::Prepaid;
        let mut condition = format!("attribute_exists(pk) AND {NEW_CALL}");
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .update_expression(if prepaid {
                "ADD reserved :d, room :nd SET senders.#n = :rec"
            } else {
                "ADD reserved :d SET senders.#n = :rec"
            })
            .expression_attribute_names("#n", hex_node(token.node))
            .expression_attribute_values(":d", n(delta))
            .expression_attribute_values(":seq", n(token.seq))
            .expression_attribute_values(":at", n(token.at))
            .expression_attribute_values(
                ":rec",
                AttributeValue::M(HashMap::from([
                    ("s".to_owned(), n(token.seq)),
                    ("g".to_owned(), n(granted)),
                    ("t".to_owned(), n(token.at)),
                ])),
            )
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if prepaid {
            req = req.expression_attribute_values(":nd", n(delta.saturating_neg()));
        }
        if let Some(at_most) = at_most {
            condition.push_str(if prepaid { " AND room >= :max" } else { " AND reserved <= :max" });
            req = req.expression_attribute_values(":max", n(at_most));
        }
        if let Some(at_least) = at_least {
            condition.push_str(" AND reserved >= :min");
            req = req.expression_attribute_values(":min", n(at_least));
        }
        match req.condition_expression(condition).send().await {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                let reserved = get_u(&item, "reserved");
                self.after_add(key, token, reserved, &item).await;
                Ok(Ok((reserved, prepaid.then(|| get_u(&item, "granted")))))
            }
            Err(e) => match e.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(c) => Ok(Err(c.item)),
                e => Err(backend(e)),
            },
        }
    }

    /// Records the counter after `token`'s call beside its grant (so a retry is answered as the
    /// call was), and forgets the oldest senders past [`SENDERS_KEPT`]: by the time of their
    /// last call (sequence numbers of different nodes do not compare), never one of the last
    /// [`SENDER_QUIET_SECS`] (its retry may still come), each only if unchanged since read.
    /// Best effort: the grant stands whatever happens here.
    pub(super) async fn after_add(&self, key: &QuotaKey, token: ReserveToken, reserved: u64, item: &Item) {
        let senders = item.get("senders").and_then(|v| v.as_m().ok());
        let mut expr = "SET senders.#n.r = :r".to_owned();
        let mut condition = "senders.#n.s = :seq".to_owned();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .expression_attribute_names("#n", hex_node(token.node))
            .expression_attribute_values(":r", n(reserved))
            .expression_attribute_values(":seq", n(token.seq));
        if let Some(senders) = senders.filter(|m| m.len() > SENDERS_KEPT) {
            // The caller's clock, as the call carried it.
            let quiet_since = token.at - SENDER_QUIET_SECS;
            // A record without a time (an earlier build's) counts as the oldest.
            let mut by_age: Vec<(Option<i64>, &String)> = senders
                .iter()
                .filter(|(node, _)| **node != hex_node(token.node))
                .filter_map(|(node, v)| v.as_m().ok().map(|m| (get_i(m, "t"), node)))
                .filter(|(t, _)| t.unwrap_or(i64::MIN) < quiet_since)
                .collect();
            by_age.sort();
            let gone = &by_age[..by_age.len().min(senders.len() - SENDERS_KEPT)];
            // The latest time forgotten is kept, over the value read (`store::quota::forgotten`).
            let before = get_i(item, "forgotten_at");
            let latest = gone.iter().filter_map(|(t, _)| *t).max();
            if let Some(latest) = latest.filter(|l| before.is_none_or(|b| *l > b)) {
                expr.push_str(", forgotten_at = :fa");
                req = req.expression_attribute_values(":fa", n(latest));
                match before {
                    Some(b) => {
                        condition.push_str(" AND forgotten_at = :fa0");
                        req = req.expression_attribute_values(":fa0", n(b));
                    }
                    None => condition.push_str(" AND attribute_not_exists(forgotten_at)"),
                }
            }
            for (i, (t, node)) in gone.iter().enumerate() {
                expr.push_str(if i == 0 { " REMOVE " } else { ", " });
                expr.push_str(&format!("senders.#d{i}"));
                req = req.expression_attribute_names(format!("#d{i}"), (*node).clone());
                match t {
                    Some(t) => {
                        condition.push_str(&format!(" AND senders.#d{i}.t = :t{i}"));
                        req = req.expression_attribute_values(format!(":t{i}"), n(t));
                    }
                    None => condition.push_str(&format!(" AND attribute_not_exists(senders.#d{i}.t)")),
                }
            }
        }
        if let Err(e) = req.update_expression(expr).condition_expression(condition).send().await {
            // A later call of the same sender went through, or a sender to forget moved on:
            // nothing to record now (the next call forgets).
            if !is_ccf(&e) {
                tracing::debug!(error = %sdk(e), "recording a quota call's answer failed");
            }
        }
    }

    /// A call's answer when its token was applied before (from the counter as it was).
    pub(super) fn seen(item: &Item, token: ReserveToken) -> Option<Grant> {
        let reserved = get_u(item, "reserved");
        let Some(rec) = item.get("senders")?.as_m().ok()?.get(&hex_node(token.node)) else {
            // A sender forgotten since its call: answered as an older call, never applied.
            return forgotten(token.at, get_i(item, "forgotten_at").unwrap_or(0)).then(|| Grant::new(0, reserved));
        };
        let rec = rec.as_m().ok()?;
        let seq = get_u(rec, "s");
        (token.seq <= seq).then(|| {
            if token.seq == seq {
                Grant::new(get_u(rec, "g"), rec.get("r").map_or(reserved, |_| get_u(rec, "r")))
            } else {
                Grant::new(0, reserved)
            }
        })
    }
}

/// The condition that `#n`'s call with `:seq` made at `:at` is new: its sender's last call is
/// older, or its sender is not remembered and it is later than every sender forgotten
/// (`store::quota::forgotten`).
const NEW_CALL: &str =
    "((attribute_not_exists(senders.#n) AND (attribute_not_exists(forgotten_at) OR forgotten_at < :at)) \
     OR senders.#n.s < :seq)";

/// The keys a refund of a grant's payment is kept under: its payment (or id) and its id.
fn kept_keys(payment: &str, id: &str) -> Vec<String> {
    let mut keys = vec![payment.to_owned()];
    if id != payment {
        keys.push(id.to_owned());
    }
    keys
}

/// A transaction's check that the item at `pk` is as read: absent, or with the same `at`.
fn unchanged(table: &str, pk: String, read: Option<&Item>) -> Result<TransactWriteItem, StoreError> {
    let check =
        aws_sdk_dynamodb::types::ConditionCheck::builder().table_name(table).key("pk", s(pk)).key("sk", s(ONE_SK));
    let check = match read.and_then(|i| get_i(i, "kept_at")) {
        Some(at) => check.condition_expression("kept_at = :at").expression_attribute_values(":at", n(at)),
        None => check.condition_expression("attribute_not_exists(pk)"),
    };
    Ok(TransactWriteItem::builder().condition_check(check.build().map_err(backend)?).build())
}

impl DynamoStore {
    /// A release on a prepaid balance: drawn on its forgiven units first
    /// ([`release_against`]), in one update conditional on the counter as read.
    async fn release_prepaid(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        for attempt in 0..ATTEMPTS {
            let Some(item) = self.get(quota_pk(key), &quota_sk(key)).await? else {
                if !self.ensure_counter(key).await? {
                    return Ok(());
                }
                continue;
            };
            if Self::seen(&item, token).is_some() {
                return Ok(());
            }
            let reserved = get_u(&item, "reserved");
            let forgiven = get_u(&item, "forgiven");
            let until = get_i(&item, "forgiven_until").unwrap_or(0);
            let mut by = forgiven_by_of(get_s(&item, "forgiven_by").unwrap_or("{}"));
            let name = hex_node(token.node);
            let last = item
                .get("senders")
                .and_then(|v| v.as_m().ok())
                .and_then(|m| m.get(&name))
                .and_then(|r| r.as_m().ok())
                .map(|r| get_u(r, "s"));
            let (after, left) = release_against(reserved, forgiven, until, &mut by, (&name, last), units, token.at);
            let drop = reserved - after;
            let out = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(quota_pk(key)))
                .key("sk", s(quota_sk(key)))
                .update_expression("ADD reserved :nd, room :d SET forgiven = :f, forgiven_by = :fb, senders.#n = :rec")
                .condition_expression(format!(
                    "attribute_exists(pk) AND {NEW_CALL} \
                     AND reserved = :r0 AND (attribute_not_exists(forgiven) OR forgiven = :f0)"
                ))
                .expression_attribute_values(":at", n(token.at))
                .expression_attribute_names("#n", name.as_str())
                .expression_attribute_values(":nd", n(-int(drop)))
                .expression_attribute_values(":d", n(drop))
                .expression_attribute_values(":f", n(left))
                .expression_attribute_values(":fb", s(forgiven_by_json(&by)))
                .expression_attribute_values(":seq", n(token.seq))
                .expression_attribute_values(":r0", n(reserved))
                .expression_attribute_values(":f0", n(forgiven))
                .expression_attribute_values(
                    ":rec",
                    AttributeValue::M(HashMap::from([
                        ("s".to_owned(), n(token.seq)),
                        ("g".to_owned(), n(0)),
                        ("t".to_owned(), n(token.at)),
                    ])),
                )
                .return_values(ReturnValue::AllNew)
                .send()
                .await;
            match out {
                Ok(out) => {
                    let item = out.attributes.unwrap_or_default();
                    self.after_add(key, token, get_u(&item, "reserved"), &item).await;
                    return Ok(());
                }
                Err(e) if is_ccf(&e) => backoff(attempt).await,
                Err(e) => return Err(sdk(e)),
            }
        }
        Err(StoreError::Conflict("a prepaid balance changed under every attempt"))
    }

    /// The grant a new grant would repeat: one of the tenant with its id (on any meter), or
    /// one of its payment, by their markers; else one under the same (tenant, meter, id).
    async fn granted_before(&self, grant: &CreditGrant) -> Result<Option<CreditGrant>, StoreError> {
        let mut markers = vec![grant_id_pk(&grant.tenant, &grant.id)];
        if let Some(p) = &grant.payment {
            markers.push(payment_pk(p));
        }
        for marker in markers {
            if let Some(m) = self.get(marker, ONE_SK).await? {
                if let (Some(t), Some(meter), Some(id)) = (get_s(&m, "tenant"), get_s(&m, "meter"), get_s(&m, "id")) {
                    if let Some(g) =
                        self.get(credit_pk(&t.into()), &credit_sk(meter, id)).await?.as_ref().and_then(credit_of)
                    {
                        return Ok(Some(g));
                    }
                }
            }
        }
        let own = self.get(credit_pk(&grant.tenant), &credit_sk(grant.meter.as_str(), &grant.id)).await?;
        if let Some(own) = own.as_ref().and_then(credit_of) {
            return Ok(Some(own));
        }
        // Grants written before the markers were (by an earlier version) have none: the
        // tenant's grants are read for the payment (grants are few, and rare).
        let Some(payment) = &grant.payment else { return Ok(None) };
        Ok(self.grants(&grant.tenant, None).await?.into_iter().find(|g| g.payment.as_ref() == Some(payment)))
    }

    /// Applies the refunds kept for `grant`'s payment (`payment`, or its id) to it, then
    /// forgets them. Idempotent: a grant takes each unit once (its `taken`).
    async fn apply_kept_refunds(&self, grant: &CreditGrant, payment: &str) -> Result<(), StoreError> {
        let keys = kept_keys(payment, &grant.id);
        let mut kept = Vec::new();
        for k in &keys {
            if let Some(item) = self.get(kept_refund_pk(k), ONE_SK).await? {
                if let Some(r) = get_s(&item, "refund").and_then(kept_refund_of) {
                    kept.push((k.clone(), item.clone(), r));
                }
            }
        }
        let Some(refund) = kept.iter().map(|(_, _, r)| r.clone()).reduce(newer_refund) else { return Ok(()) };
        if grant.closed.is_none() {
            self.apply_refund_to(&grant.tenant, &grant.meter, &refund.landing(grant)).await?;
        }
        for (k, item, _) in kept {
            // Only as read: a newer copy kept meanwhile stays, for the next delivery.
            let _ = self
                .client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(kept_refund_pk(&k)))
                .key("sk", s(ONE_SK))
                .condition_expression("kept_at = :at")
                .expression_attribute_values(":at", n(get_i(&item, "kept_at").unwrap_or(0)))
                .send()
                .await;
        }
        Ok(())
    }

    /// Applies `refund` to its open grant of `(tenant, meter)`: the grant's id and the units
    /// taken from what it held, or `None` when it takes nothing more; one transaction on the
    /// grant (as read: its units and `taken`) and the balance (as read).
    async fn apply_refund_to(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        refund: &CreditRefund,
    ) -> Result<Option<(String, u64)>, StoreError> {
        let key = prepaid_key(tenant, meter);
        for attempt in 0..ATTEMPTS {
            let Some((balance, all, forgiving)) = self.read_balance(&key).await? else { return Ok(None) };
            let open: Vec<CreditGrant> = all.into_iter().filter(|g| g.closed.is_none()).collect();
            let Some(grant) = open.iter().find(|g| refund.is_of(g)) else { return Ok(None) };
            let Some((units, removed, taken, after, used)) = refund_against(&open, refund, balance) else {
                return Ok(None);
            };
            let (after, by) = forgive(balance, after, forgiving.0, used, &forgiving.1, refund.at);
            let take = Update::builder()
                .table_name(&self.table)
                .key("pk", s(credit_pk(tenant)))
                .key("sk", s(credit_sk(meter.as_str(), &grant.id)))
                // Written by an earlier build without its units bought: they are its units now.
                .update_expression("SET units = :u, taken = :t, bought = if_not_exists(bought, :u0)")
                .condition_expression(
                    "attribute_exists(pk) AND attribute_not_exists(closed_at) AND units = :u0 \
                     AND (attribute_not_exists(taken) OR taken = :t0)",
                )
                .expression_attribute_values(":u", n(grant.units - removed))
                .expression_attribute_values(":t", n(taken))
                .expression_attribute_values(":u0", n(grant.units))
                .expression_attribute_values(":t0", n(grant.taken));
            let actions = vec![
                TransactWriteItem::builder().update(take.build().map_err(backend)?).build(),
                self.set_balance(&key, balance, after, &by)?,
            ];
            match self.transact(actions, "a credit grant's refund").await? {
                None => return Ok(Some((grant.id.clone(), units))),
                Some(_) => backoff(attempt).await,
            }
        }
        Err(StoreError::Conflict("a prepaid balance changed under every attempt"))
    }

    /// Keeps a refund whose grant has not landed, under its payment and invoice, the newer of
    /// two copies winning, on the condition that no grant of the payment has landed:
    /// `Some(Kept)` or `Some(Full)`, `None` when a condition failed (read again).
    async fn keep_refund(&self, refund: &CreditRefund) -> Result<Option<RefundOutcome>, StoreError> {
        let mut keys = vec![refund.payment.clone()];
        if let Some(i) = refund.invoice.as_ref().filter(|i| **i != refund.payment) {
            keys.push(i.clone());
        }
        let mut actions = Vec::new();
        // No grant of the payment (nor of its invoice, as an id: checked by the grant's own
        // transaction against the kept items).
        let check = aws_sdk_dynamodb::types::ConditionCheck::builder()
            .table_name(&self.table)
            .key("pk", s(payment_pk(&refund.payment)))
            .key("sk", s(ONE_SK))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(backend)?;
        actions.push(TransactWriteItem::builder().condition_check(check).build());
        let mut new = false;
        for k in &keys {
            let read = self.get(kept_refund_pk(k), ONE_SK).await?;
            let before = read.as_ref().and_then(|i| get_s(i, "refund")).and_then(kept_refund_of);
            new |= before.is_none();
            let kept = match before {
                Some(b) => newer_refund(b, refund.clone()),
                None => refund.clone(),
            };
            let mut put = Put::builder()
                .table_name(&self.table)
                .item("pk", s(kept_refund_pk(k)))
                .item("sk", s(ONE_SK))
                .item("refund", s(kept_refund_json(&kept)))
                .item("kept_at", n(kept.at))
                .item("ttl", n(kept.at.saturating_add(contract::REFUNDS_KEPT_SECS)));
            put = match read.as_ref().and_then(|i| get_i(i, "kept_at")) {
                Some(at) => put.condition_expression("kept_at = :at0").expression_attribute_values(":at0", n(at)),
                None => put.condition_expression("attribute_not_exists(pk)"),
            };
            actions.push(TransactWriteItem::builder().put(put.build().map_err(backend)?).build());
        }
        if new {
            // At most REFUNDS_KEPT_MAX kept: shared out over the days they are kept.
            let per_day = (contract::REFUNDS_KEPT_MAX as u64).div_ceil((contract::REFUNDS_KEPT_SECS / 86_400) as u64);
            let day = refund.at.div_euclid(86_400);
            let count = Update::builder()
                .table_name(&self.table)
                .key("pk", s(kept_refunds_count_pk(day)))
                .key("sk", s(ONE_SK))
                .update_expression("ADD n :one SET #ttl = :ttl")
                .condition_expression("attribute_not_exists(n) OR n < :most")
                .expression_attribute_names("#ttl", "ttl")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":most", n(per_day))
                .expression_attribute_values(":ttl", n((day + 36) * 86_400));
            actions.push(TransactWriteItem::builder().update(count.build().map_err(backend)?).build());
        }
        match self.transact(actions, "a kept refund").await? {
            None => Ok(Some(RefundOutcome::Kept)),
            Some(reasons) => {
                // The day's count alone refused: full.
                let failed: Vec<usize> = reasons
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.as_deref() == Some("ConditionalCheckFailed"))
                    .map(|(i, _)| i)
                    .collect();
                if new && failed == [reasons.len() - 1] {
                    return Ok(Some(RefundOutcome::Full));
                }
                Ok(None)
            }
        }
    }
}
