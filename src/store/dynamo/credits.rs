//! Prepaid balances on the DynamoStore: the balance's counter (its grants, its reserved units
//! and the room between them), its grants as items of their own, the markers of their ids and
//! payments, refunds kept for grants that have not landed yet, and the reserves and releases
//! of a balance.

use super::quota::{claims, dropped, keeping_of, record, Add, Revived, NEW_CALL};
use super::race::{Race, Retries};
use super::*;
use crate::store::quota::{mark, mark_after};
use crate::{
    base::{MeterId, Period},
    store::{
        contract,
        quota::{
            close_against, close_used_up, fits, forgive, forgiven_by_json, forgiven_by_of, kept_refund_json,
            kept_refund_of, newer_refund, refund_against, release_against, takes_json, takes_of, CreditRefund,
            ForgivenBy, Keeping, SenderCall,
        },
        CreditBalance, CreditClosure, CreditGrant, GrantOutcome, Kept, RefundOutcome, Release,
    },
};

impl DynamoStore {
    pub(super) async fn grant(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
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
        let (key, pk, sk) = (&key, &pk, &sk);
        self.until_won("a credit grant raced with refunds under every attempt", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                // One grant per id on every meter of the tenant, and one per payment.
                if let Some(seen) = self.granted_before(grant).await? {
                    // A refund kept for it is applied now (a crash between the grant and its
                    // refund's application is repaired by Stripe's redelivery of the grant).
                    self.apply_kept_refunds(&seen, payment).await?;
                    return Ok(Race::Won(GrantOutcome::Duplicate(seen)));
                }
                // The balance's open grants, as its counter counts them (counted from the grants
                // where an earlier build kept no count).
                let counter = self.get(quota_pk(key), &quota_sk(key)).await?.unwrap_or_default();
                let was = open_count(&counter);
                let open = match was {
                    Some(n) => n,
                    None => self.open_grants(&grant.tenant, &grant.meter).await?.len() as u64,
                };
                if open >= contract::OPEN_GRANTS_MAX as u64 {
                    // Used-up grants close first, losing nothing, to make room.
                    if self.close_used_up(key, grant.granted_at).await? {
                        return Ok(Race::Again(()));
                    }
                    return Ok(Race::Won(GrantOutcome::TooMany));
                }
                let count = Open::Set { was, now: open + 1 };
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
                    let Some((before, mut open, forgiving, _)) = self.read_balance(key).await? else {
                        return Err(StoreError::Conflict("the prepaid counter"));
                    };
                    if !fits(before.granted, grant.units) {
                        return Ok(Race::Won(GrantOutcome::TooLarge));
                    }
                    open.retain(|g| g.closed.is_none());
                    open.push(landed.clone());
                    let with = CreditBalance { granted: before.granted.saturating_add(grant.units), ..before };
                    if let Ok(applied) = refund_against(&open, refund, with) {
                        let (after, by) =
                            forgive(before, applied.after, forgiving.0, applied.used, &forgiving.1, refund.at);
                        landed.units = applied.grant.units;
                        landed.taken = applied.grant.taken;
                        balance_write = Some(self.set_balance(key, before, after, &by, count)?);
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
                    .key("pk", s(quota_pk(key)))
                    .key("sk", s(quota_sk(key)))
                    .update_expression("SET open_grants = :o ADD granted :u, room :u")
                    // Never past the most a balance holds; counted over the count as read.
                    .condition_expression(format!(
                        "attribute_exists(pk) AND granted <= :most AND {}",
                        count.condition()
                    ))
                    .expression_attribute_values(":u", n(grant.units))
                    .expression_attribute_values(":o", n(open + 1))
                    .expression_attribute_values(":most", n(contract::MAX_BALANCE - grant.units));
                let add = match was {
                    Some(was) => add.expression_attribute_values(":o0", n(was)),
                    None => add,
                };
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
                        return Ok(Race::Again(()));
                    }
                    let now: Vec<Option<Item>> = {
                        let mut v = Vec::new();
                        for k in &kept_keys {
                            v.push(self.get(kept_refund_pk(k), ONE_SK).await?);
                        }
                        v
                    };
                    let counter = self.get(quota_pk(key), &quota_sk(key)).await?.unwrap_or_default();
                    let fits_now = fits(get_u(&counter, "granted"), grant.units);
                    if now != kept || refund.is_some() || open_count(&counter) != was || fits_now {
                        // (With a refund, the balance is set as read: a reserve meanwhile. A
                        // grant or a close meanwhile changed the count. Fitting now, the
                        // condition failed on something else that changed.)
                        return Ok(Race::Lost(()));
                    }
                    return Ok(Race::Won(GrantOutcome::TooLarge));
                }
                let stored = self.get(pk.clone(), sk).await?.as_ref().and_then(credit_of);
                if let Some(stored) = stored {
                    self.apply_kept_refunds(&stored, payment).await?;
                }
                let counter = self.get(quota_pk(key), &quota_sk(key)).await?.unwrap_or_default();
                Ok(Race::Won(GrantOutcome::Granted(CreditBalance::new(
                    get_u(&counter, "granted"),
                    get_u(&counter, "reserved"),
                ))))
            })
        })
        .await
    }

    pub(super) async fn grants_and_balances(
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

    pub(super) async fn close_grant(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        let key = &prepaid_key(tenant, meter);
        self.until_won("a prepaid balance changed under every attempt", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                // The balance first, then its grants: a grant or a close after the read changes the
                // balance, so the condition below refuses a computation over grants read before.
                let Some((balance, all, forgiving, was)) = self.read_balance(key).await? else {
                    return Ok(Race::Won(None));
                };
                let open: Vec<CreditGrant> = all.iter().filter(|g| g.closed.is_none()).cloned().collect();
                let due = open
                    .iter()
                    .find(|g| g.id == id)
                    .is_some_and(|g| revoke || g.expires_at.is_some_and(|at| at <= now));
                if !due {
                    return Ok(Race::Won(None));
                }
                let Some((lost, after, used)) = close_against(&open, id, balance, revoke) else {
                    return Ok(Race::Won(None));
                };
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
                // The count as the grants say it (one an earlier build's grants did not count
                // is corrected here).
                let count = Open::Set { was, now: (open.len() as u64).saturating_sub(1) };
                let actions = vec![
                    TransactWriteItem::builder().update(close.build().map_err(backend)?).build(),
                    self.set_balance(key, balance, after, &by, count)?,
                ];
                match self.transact(actions, "a credit grant's closing").await? {
                    None => {
                        // Its markers go with it, once it is dropped (best effort: a marker left
                        // names a closed grant, which refunds and grants read as such).
                        let ttl = now.saturating_add(contract::CLOSED_GRANTS_KEPT_SECS);
                        self.expire_markers(tenant, id, payment.as_deref(), ttl).await;
                        // Closed grants are kept a while (their ids, for duplicates), then dropped.
                        for old in all.iter().filter(|g| g.kept_until().is_some_and(|until| until <= now)) {
                            let _ = self
                                .client
                                .delete_item()
                                .table_name(&self.table)
                                .key("pk", s(credit_pk(tenant)))
                                .key("sk", s(credit_sk(meter.as_str(), &old.id)))
                                .send()
                                .await;
                        }
                        Ok(Race::Won(Some(CreditClosure { at: now, revoked: revoke, lost })))
                    }
                    Some(_) => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }

    /// Closes the used-up grants of the balance `key` at `now` (`store::quota::close_used_up`),
    /// at most 99 in each transaction with the balance (as read), or corrects the count of its
    /// open grants: whether anything changed.
    async fn close_used_up(&self, key: &QuotaKey, now: i64) -> Result<bool, StoreError> {
        let mut changed = false;
        while self.close_some_used_up(key, now).await? {
            changed = true;
        }
        Ok(changed)
    }

    /// One step of [`close_used_up`](Self::close_used_up): whether it changed anything.
    async fn close_some_used_up(&self, key: &QuotaKey, now: i64) -> Result<bool, StoreError> {
        let (tenant, meter) = (&key.tenant, &key.meter);
        self.until_won("a prepaid balance changed under every attempt", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let Some(counter) = self.get(quota_pk(key), &quota_sk(key)).await? else {
                    return Ok(Race::Won(false));
                };
                let balance = CreditBalance::new(get_u(&counter, "granted"), get_u(&counter, "reserved"))
                    .forgiving(get_u(&counter, "forgiven"), get_i(&counter, "forgiven_until").unwrap_or(0));
                let by = forgiven_by_of(get_s(&counter, "forgiven_by").unwrap_or("{}"));
                let grants = self.grants(tenant, Some(meter)).await?;
                let kept = kept_all(&counter);
                let (mut ids, _) = close_used_up(&grants, balance, kept);
                // The first of them in spending order, as one transaction holds.
                ids.truncate(99);
                // The count of open grants as the grants say it (a count an earlier build began
                // may be over by a close it did not count).
                let was = open_count(&counter);
                let open = grants.iter().filter(|g| g.closed.is_none()).count() as u64;
                if ids.is_empty() {
                    if was == Some(open) || open >= contract::OPEN_GRANTS_MAX as u64 {
                        return Ok(Race::Won(false));
                    }
                    let actions = vec![self.set_balance(key, balance, balance, &by, Open::Set { was, now: open })?];
                    return Ok(match self.transact(actions, "a count of open credit grants").await? {
                        None => Race::Won(true),
                        Some(_) => Race::Lost(()),
                    });
                }
                let closing: Vec<&CreditGrant> =
                    grants.iter().filter(|g| g.closed.is_none() && ids.contains(&g.id)).collect();
                let units = closing.iter().fold(0u64, |a, g| a.saturating_add(g.units));
                let ttl = now.saturating_add(contract::USED_UP_GRANTS_KEPT_SECS);
                let count = Open::Set { was, now: open.saturating_sub(closing.len() as u64) };
                // The units leave both totals by an addition, on the condition that the grants
                // (and what is forgiven) are as read, not the reserved units: a reserve, a
                // release or an expiry meanwhile never lowers the units used that no sender
                // keeps (each moves a lease's units and what its sender keeps alike), so what
                // was used up when read still is, and a busy balance's close is not refused
                // by every call that lands meanwhile.
                // The units left the bottom of the used total: each sender's last call ("r") is
                // that much lower in it now, so a later close or refund finds its lease where it
                // is (a sender forgotten meanwhile fails the write, which is tried again).
                let senders: Vec<String> = counter
                    .get("senders")
                    .and_then(|v| v.as_m().ok())
                    .map(|m| {
                        m.iter()
                            .filter(|(_, rec)| rec.as_m().ok().is_some_and(|r| r.contains_key("r")))
                            .map(|(node, _)| node.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let minus = if units == 0 { "0".to_owned() } else { format!("-{units}") };
                let lowered: String = (0..senders.len()).map(|i| format!(", senders.#n{i}.r :minus")).collect();
                let mut less = Update::builder()
                    .table_name(&self.table)
                    .key("pk", s(quota_pk(key)))
                    .key("sk", s(quota_sk(key)))
                    .update_expression(format!("SET open_grants = :o ADD granted :minus, reserved :minus{lowered}"))
                    // What nodes keep stays in the used total (a reversal of a closed grant's
                    // take may have lowered it since it was read).
                    .condition_expression(format!(
                        "granted = :g0 AND reserved >= :need AND (attribute_not_exists(forgiven) OR forgiven = :f0) \
                         AND {}",
                        count.condition()
                    ))
                    .expression_attribute_values(":o", n(open.saturating_sub(closing.len() as u64)))
                    .expression_attribute_values(":minus", AttributeValue::N(minus))
                    .expression_attribute_values(":need", n(units.saturating_add(kept)))
                    .expression_attribute_values(":g0", n(balance.granted))
                    .expression_attribute_values(":f0", n(balance.forgiven));
                for (i, node) in senders.iter().enumerate() {
                    less = less.expression_attribute_names(format!("#n{i}"), node);
                }
                let less = match was {
                    Some(was) => less.expression_attribute_values(":o0", n(was)),
                    None => less,
                };
                let mut actions = vec![TransactWriteItem::builder().update(less.build().map_err(backend)?).build()];
                for g in &closing {
                    let close = Update::builder()
                        .table_name(&self.table)
                        .key("pk", s(credit_pk(tenant)))
                        .key("sk", s(credit_sk(meter.as_str(), &g.id)))
                        .update_expression(
                            "SET closed_at = :at, revoked = :rv, lost = :lost, #ttl = :ttl REMOVE gpk, gsk",
                        )
                        .expression_attribute_names("#ttl", "ttl")
                        .condition_expression("attribute_exists(pk) AND attribute_not_exists(closed_at) AND units = :u")
                        .expression_attribute_values(":at", n(now))
                        .expression_attribute_values(":rv", AttributeValue::Bool(false))
                        .expression_attribute_values(":lost", n(0u64))
                        .expression_attribute_values(":ttl", n(ttl))
                        .expression_attribute_values(":u", n(g.units));
                    actions.push(TransactWriteItem::builder().update(close.build().map_err(backend)?).build());
                }
                match self.transact(actions, "used-up credit grants' closing").await? {
                    None => {
                        // Their markers go with them, once they are dropped (best effort).
                        for g in &closing {
                            self.expire_markers(tenant, &g.id, g.payment.as_deref(), ttl).await;
                        }
                        Ok(Race::Won(true))
                    }
                    Some(_) => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }

    /// A closed grant's markers (its id's, its payment's) expire with it at `ttl`, once it is
    /// dropped. Best effort: a marker left names a closed grant, which refunds and grants read
    /// as such.
    async fn expire_markers(&self, tenant: &TenantId, id: &str, payment: Option<&str>, ttl: i64) {
        for marker in std::iter::once(grant_id_pk(tenant, id)).chain(payment.map(payment_pk)) {
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
    }

    pub(super) async fn refund_grant(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        self.until_won("a refund raced with its grant under every attempt", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
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
                    if !grant.refundable() {
                        return Ok(Race::Won(RefundOutcome::Nothing));
                    }
                    return Ok(Race::Won(
                        self.apply_refund_to(&grant.tenant, &grant.meter, refund).await?.unwrap_or_else(|o| o),
                    ));
                }
                // No grant yet: kept, on the condition that no grant of the payment landed meanwhile.
                Ok(match self.keep_refund(refund).await? {
                    Some(outcome) => Race::Won(outcome),
                    None => Race::Lost(()),
                })
            })
        })
        .await
    }

    pub(super) async fn expired_grants(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
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
    pub(super) async fn reserve_prepaid(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let from = (r.units, Revived::No);
        self.until_won(
            "a prepaid balance changed under every attempt",
            Retries::QUICK_FIRST,
            from,
            |(units, revived), _| {
                Box::pin(async move {
                    let need = (units > 0).then(|| int(r.owed.saturating_add(r.left_needed(units))));
                    let kept = if revived.any() { dropped(r.kept) } else { r.kept };
                    let keeping = Keeping::after(kept, units, r.taking, r.expires_at);
                    let call = Add {
                        delta: int(r.owed.saturating_add(units)),
                        granted: units,
                        at_most: need,
                        at_least: None,
                        keeping,
                        revived,
                        answered: true,
                        claims: claims(r.kept),
                    };
                    Ok(match self.add(&r.key, &call, r.token).await? {
                        Ok((grant, granted)) => Race::Won(grant.with_limit(granted)),
                        Err(None) if !self.ensure_counter(&r.key).await? => Race::Won(Grant::new(0, 0)),
                        Err(None) => Race::Again((units, revived)),
                        Err(Some(item)) => match Self::seen(&item, r.token) {
                            Some(grant) => Race::Won(grant.with_limit(Some(get_u(&item, "granted")))),
                            None => {
                                let again = match revived {
                                    Revived::No => self.revival(&r.key, r.token, &item, r.kept).await?,
                                    _ => Revived::No,
                                };
                                if again.any() {
                                    Race::Again((units, again))
                                } else {
                                    let room = get_i(&item, "room").unwrap_or(0);
                                    let left = u64::try_from(room.saturating_sub(int(r.owed))).unwrap_or(0);
                                    Race::Lost((r.grant_for(left), revived))
                                }
                            }
                        },
                    })
                })
            },
        )
        .await
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
pub(super) fn prepaid_key(tenant: &TenantId, meter: &MeterId) -> QuotaKey {
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
    ) -> Result<Option<(CreditBalance, Vec<CreditGrant>, (ForgivenBy, Vec<SenderCall>), Option<u64>)>, StoreError> {
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
        Ok(Some((balance, self.grants(&key.tenant, Some(&key.meter)).await?, (by, senders), open_count(&counter))))
    }

    /// Sets a balance to `after` (forgiven per sender as `by`), only if it is still `before`
    /// (a reserve or release meanwhile makes the caller read it again).
    fn set_balance(
        &self,
        key: &QuotaKey,
        before: CreditBalance,
        after: CreditBalance,
        by: &ForgivenBy,
        open: Open,
    ) -> Result<TransactWriteItem, StoreError> {
        let room = i128::from(after.granted) - i128::from(after.reserved);
        let (count, condition) = match open {
            Open::Keep => ("", "attribute_exists(pk)".to_owned()),
            Open::Set { .. } => (", open_grants = :o", open.condition()),
        };
        let set = Update::builder()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .update_expression(format!(
                "SET granted = :g, reserved = :r, room = :room, forgiven = :f, forgiven_until = :fu, forgiven_by = :fb{count}"
            ))
            .condition_expression(format!(
                "granted = :g0 AND reserved = :r0 AND (attribute_not_exists(forgiven) OR forgiven = :f0) AND {condition}"
            ))
            .expression_attribute_values(":f", n(after.forgiven))
            .expression_attribute_values(":fu", n(after.forgiven_until))
            .expression_attribute_values(":fb", s(forgiven_by_json(by)))
            .expression_attribute_values(":f0", n(before.forgiven))
            .expression_attribute_values(":g", n(after.granted))
            .expression_attribute_values(":r", n(after.reserved))
            .expression_attribute_values(":room", AttributeValue::N(room.to_string()))
            .expression_attribute_values(":g0", n(before.granted))
            .expression_attribute_values(":r0", n(before.reserved));
        let set = match open {
            Open::Keep => set,
            Open::Set { was: None, now } => set.expression_attribute_values(":o", n(now)),
            Open::Set { was: Some(was), now } => {
                set.expression_attribute_values(":o", n(now)).expression_attribute_values(":o0", n(was))
            }
        };
        Ok(TransactWriteItem::builder().update(set.build().map_err(backend)?).build())
    }
}

/// What a write of a prepaid balance does to its count of open grants (`open_grants` on its
/// counter item, beside the units: a grant reads it instead of every grant of the balance).
#[derive(Debug, Clone, Copy)]
enum Open {
    /// Leaves it (a refund; a close of a balance whose count an earlier build never began: the
    /// next grant counts its grants).
    Keep,
    /// Sets it to `now`, over the count as read (`None`: none kept yet).
    Set { was: Option<u64>, now: u64 },
}

impl Open {
    /// The condition that the count is as read.
    fn condition(self) -> String {
        match self {
            Open::Set { was: Some(_), .. } => "open_grants = :o0".to_owned(),
            _ => "attribute_not_exists(open_grants)".to_owned(),
        }
    }
}

/// The count of open grants a balance's counter item keeps, if it keeps one.
fn open_count(counter: &Item) -> Option<u64> {
    counter.contains_key("open_grants").then(|| get_u(counter, "open_grants"))
}

/// What every sender of a counter item keeps (leases, holds, jobs' reservations), expired or
/// not: all of it may still lower the counter when it is given back.
fn kept_all(item: &Item) -> u64 {
    let senders = item.get("senders").and_then(|v| v.as_m().ok());
    senders
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_m().ok().map(keeping_of))
        .fold(0u64, |a, k| a.saturating_add(k.kept.total()))
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
    g.takes = get_s(item, "takes").map(takes_of).unwrap_or_default();
    if let Some(at) = get_i(item, "closed_at") {
        let revoked = item.get("revoked").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
        g.closed = Some(CreditClosure { at, revoked, lost: get_u(item, "lost") });
    }
    Some(g)
}

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
    pub(super) async fn release_prepaid(&self, r: &Release) -> Result<(), StoreError> {
        let (key, units, token) = (&r.key, r.units, r.token);
        // What it kept before the release (a revived sender's units went back at its expiry).
        let before = Kept { lease: r.kept.lease.saturating_add(units), ..r.kept };
        self.until_won(
            "a prepaid balance changed under every attempt",
            Retries::BACKING_OFF,
            Revived::No,
            |revived, _| {
                Box::pin(async move {
                    let Some(item) = self.get(quota_pk(key), &quota_sk(key)).await? else {
                        if !self.ensure_counter(key).await? {
                            return Ok(Race::Won(()));
                        }
                        return Ok(Race::Again(revived));
                    };
                    if Self::seen(&item, token).is_some() {
                        return Ok(Race::Won(()));
                    }
                    let name = hex_node(token.node);
                    let rec = item
                        .get("senders")
                        .and_then(|v| v.as_m().ok())
                        .and_then(|m| m.get(&name))
                        .and_then(|r| r.as_m().ok());
                    // A sender whose reservation the store gave back (`store::quota::standing`).
                    if revived == Revived::No {
                        let told = rec.is_some_and(|m| get_i(m, "x") == Some(mark::TELL));
                        match rec {
                            None if claims(before) => return Ok(Race::Again(Revived::Unknown)),
                            Some(_) if told => return Ok(Race::Again(Revived::Known)),
                            Some(m) if keeping_of(m).gone > 0 => {
                                return Ok(if self.revive_sender(key, token, &item, before).await? {
                                    Race::Again(Revived::Known)
                                } else {
                                    Race::Lost(Revived::No)
                                });
                            }
                            _ => {}
                        }
                    }
                    let reserved = get_u(&item, "reserved");
                    let forgiven = get_u(&item, "forgiven");
                    let until = get_i(&item, "forgiven_until").unwrap_or(0);
                    let mut by = forgiven_by_of(get_s(&item, "forgiven_by").unwrap_or("{}"));
                    let last = rec.map(|r| get_u(r, "s"));
                    // A revived sender's units went back at its expiry: not again.
                    let (after, left) = if revived.any() {
                        (reserved, forgiven)
                    } else {
                        release_against(reserved, forgiven, until, &mut by, (&name, last), units, token.at)
                    };
                    let drop = reserved - after;
                    let keeping =
                        Keeping::after(if revived.any() { dropped(r.kept) } else { r.kept }, 0, 0, r.expires_at);
                    let x = match revived {
                        Revived::Known => "senders.#n.x = :m1",
                        Revived::Unknown => "attribute_not_exists(senders.#n)",
                        Revived::No if claims(before) => {
                            "(attribute_not_exists(senders.#n.x) OR senders.#n.x = :z OR senders.#n.x = :m2) \
                         AND attribute_exists(senders.#n)"
                        }
                        Revived::No => {
                            "(attribute_not_exists(senders.#n.x) OR senders.#n.x = :z OR senders.#n.x = :m2)"
                        }
                    };
                    let marks: Vec<(&str, i64)> = match revived {
                        Revived::Known => vec![(":m1", mark::TELL)],
                        Revived::Unknown => vec![],
                        Revived::No => vec![(":z", mark::NONE), (":m2", mark::TOLD)],
                    };
                    let out = self
                        .client
                        .update_item()
                        .table_name(&self.table)
                        .key("pk", s(quota_pk(key)))
                        .key("sk", s(quota_sk(key)))
                        .update_expression(
                            "ADD reserved :nd, room :d SET forgiven = :f, forgiven_by = :fb, senders.#n = :rec",
                        )
                        .condition_expression(format!(
                            "attribute_exists(pk) AND {NEW_CALL} AND {x} \
                     AND reserved = :r0 AND (attribute_not_exists(forgiven) OR forgiven = :f0)"
                        ))
                        .expression_attribute_names("#n", name.as_str())
                        .set_expression_attribute_values(Some(
                            marks
                                .iter()
                                .map(|(k, v)| ((*k).to_owned(), n(*v)))
                                .chain([
                                    (":newer".to_owned(), n(super::quota::newer(token.at))),
                                    (":nd".to_owned(), n(-int(drop))),
                                    (":d".to_owned(), n(drop)),
                                    (":f".to_owned(), n(left)),
                                    (":fb".to_owned(), s(forgiven_by_json(&by))),
                                    (":seq".to_owned(), n(token.seq)),
                                    (":r0".to_owned(), n(reserved)),
                                    (":f0".to_owned(), n(forgiven)),
                                    (":rec".to_owned(), record(token, 0, &keeping, mark_after(revived.any(), false))),
                                ])
                                .collect(),
                        ))
                        .return_values(ReturnValue::AllNew)
                        .send()
                        .await;
                    match out {
                        Ok(out) => {
                            let item = out.attributes.unwrap_or_default();
                            let reserved =
                                get_u(&item, "reserved").saturating_sub(self.expire_others(key, token, &item).await);
                            self.after_add(key, token, reserved, &item).await;
                            Ok(Race::Won(()))
                        }
                        // Changed meanwhile, or inside another node's transaction: read again.
                        Err(e) if is_ccf(&e) || is_conflict(&e) => Ok(Race::Lost(revived)),
                        Err(e) => Err(sdk(e)),
                    }
                })
            },
        )
        .await
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
        self.grant_paid_by(&grant.tenant, payment).await
    }

    /// The tenant's grant of `payment`, looked for among all its grants (those made before
    /// the markers were have none): the query reads them all, and returns only that one.
    async fn grant_paid_by(&self, tenant: &TenantId, payment: &str) -> Result<Option<CreditGrant>, StoreError> {
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("pk = :pk")
                .filter_expression("payment = :p")
                .expression_attribute_values(":pk", s(credit_pk(tenant)))
                .expression_attribute_values(":p", s(payment))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            if let Some(g) = page.items.unwrap_or_default().iter().find_map(credit_of) {
                return Ok(Some(g));
            }
            match page.last_evaluated_key {
                Some(k) => start = Some(k),
                None => return Ok(None),
            }
        }
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
            let _ = self.apply_refund_to(&grant.tenant, &grant.meter, &refund.landing(grant)).await?;
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
    ) -> Result<Result<RefundOutcome, RefundOutcome>, StoreError> {
        let key = &prepaid_key(tenant, meter);
        self.until_won("a prepaid balance changed under every attempt", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let Some((balance, all, forgiving, _)) = self.read_balance(key).await? else {
                    return Ok(Race::Won(Err(RefundOutcome::Nothing)));
                };
                // The open grants, and the closed ones a refund still reaches (closed used up).
                let open: Vec<CreditGrant> = all.into_iter().filter(CreditGrant::refundable).collect();
                let of = |open: bool| move |g: &&CreditGrant| g.closed.is_none() == open && refund.is_of(g);
                let Some(grant) = open.iter().find(of(true)).or_else(|| open.iter().find(of(false))) else {
                    return Ok(Race::Won(Err(RefundOutcome::Nothing)));
                };
                let applied = match refund_against(&open, refund, balance) {
                    Ok(applied) => applied,
                    Err(outcome) => return Ok(Race::Won(Err(outcome))),
                };
                let (after, by) = forgive(balance, applied.after, forgiving.0, applied.used, &forgiving.1, refund.at);
                let now = &applied.grant;
                // The takes as stored, compared as written (not as read back and written again).
                let stored = self.get(credit_pk(tenant), &credit_sk(meter.as_str(), &grant.id)).await?;
                let takes = stored.as_ref().and_then(|i| get_s(i, "takes")).map(str::to_owned);
                if takes.as_deref().map(takes_of).unwrap_or_default() != grant.takes {
                    // Changed since the balance was read: read again.
                    return Ok(Race::Lost(()));
                }
                let take = Update::builder()
                    .table_name(&self.table)
                    .key("pk", s(credit_pk(tenant)))
                    .key("sk", s(credit_sk(meter.as_str(), &grant.id)))
                    // Written by an earlier build without its units bought: they are its units now.
                    .update_expression("SET units = :u, taken = :t, takes = :k, bought = if_not_exists(bought, :u0)")
                    .condition_expression(format!(
                        "attribute_exists(pk) AND {} AND units = :u0 \
                         AND (attribute_not_exists(taken) OR taken = :t0) AND {}",
                        if grant.closed.is_some() {
                            "attribute_exists(closed_at)"
                        } else {
                            "attribute_not_exists(closed_at)"
                        },
                        if takes.is_some() { "takes = :k0" } else { "attribute_not_exists(takes)" }
                    ))
                    .expression_attribute_values(":u", n(now.units))
                    .expression_attribute_values(":t", n(now.taken))
                    .expression_attribute_values(":k", s(takes_json(&now.takes)))
                    .expression_attribute_values(":u0", n(grant.units))
                    .expression_attribute_values(":t0", n(grant.taken));
                let take = match takes {
                    Some(k0) => take.expression_attribute_values(":k0", s(k0)),
                    None => take,
                };
                let actions = vec![
                    TransactWriteItem::builder().update(take.build().map_err(backend)?).build(),
                    self.set_balance(key, balance, after, &by, Open::Keep)?,
                ];
                Ok(match self.transact(actions, "a credit grant's refund").await? {
                    None => Race::Won(Ok(applied.outcome())),
                    Some(_) => Race::Lost(()),
                })
            })
        })
        .await
    }

    /// Keeps a refund whose grant has not landed, under its payment and invoice, the newer of
    /// two copies winning, on the condition that no grant of the payment has landed:
    /// `Some(Kept)` or `Some(Full)`, `None` when a condition failed (read again).
    async fn keep_refund(&self, refund: &CreditRefund) -> Result<Option<RefundOutcome>, StoreError> {
        if !refund.kept() {
            return Ok(Some(RefundOutcome::Unknown));
        }
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
