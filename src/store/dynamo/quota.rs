//! The quota role of the DynamoStore.

use super::*;
use crate::{
    base::{MeterId, Period},
    store::{
        contract,
        quota::{close_against, fits, refund_against, CreditRefund},
        CreditBalance, CreditClosure, CreditGrant, GrantOutcome,
    },
};

#[async_trait]
impl QuotaStore for DynamoStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
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
        if let Some(item) = self.get(pk.clone(), &sk).await? {
            return Ok(GrantOutcome::Duplicate(credit_of(&item).ok_or(StoreError::Conflict("a credit item"))?));
        }
        if self.open_grants(&grant.tenant, &grant.meter).await?.len() >= contract::OPEN_GRANTS_MAX {
            return Ok(GrantOutcome::TooMany);
        }
        let mut put = Put::builder()
            .table_name(&self.table)
            .item("pk", s(pk.clone()))
            .item("sk", s(sk.clone()))
            .item("tenant", s(grant.tenant.as_str()))
            .item("meter", s(grant.meter.as_str()))
            .item("id", s(grant.id.as_str()))
            .item("units", n(grant.units))
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
        let add = Update::builder()
            .table_name(&self.table)
            .key("pk", s(quota_pk(&key)))
            .key("sk", s(quota_sk(&key)))
            .update_expression("ADD granted :u, room :u")
            // Never past the most a balance holds.
            .condition_expression("attribute_exists(pk) AND granted <= :most")
            .expression_attribute_values(":u", n(grant.units))
            .expression_attribute_values(":most", n(contract::MAX_BALANCE - grant.units));
        let actions = vec![
            TransactWriteItem::builder().put(put.build().map_err(backend)?).build(),
            TransactWriteItem::builder().update(add.build().map_err(backend)?).build(),
        ];
        if self.transact(actions, "a credit grant").await?.is_some() {
            // Granted under this id meanwhile: as stored; else the balance would pass its most.
            return match self.get(pk, &sk).await? {
                Some(item) => {
                    Ok(GrantOutcome::Duplicate(credit_of(&item).ok_or(StoreError::Conflict("a credit item"))?))
                }
                None => Ok(GrantOutcome::TooLarge),
            };
        }
        let counter = self.get(quota_pk(&key), &quota_sk(&key)).await?.unwrap_or_default();
        Ok(GrantOutcome::Granted(CreditBalance::new(get_u(&counter, "granted"), get_u(&counter, "reserved"))))
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
            let Some((balance, all)) = self.read_balance(&key).await? else { return Ok(None) };
            let open: Vec<CreditGrant> = all.iter().filter(|g| g.closed.is_none()).cloned().collect();
            let due =
                open.iter().find(|g| g.id == id).is_some_and(|g| revoke || g.expires_at.is_some_and(|at| at <= now));
            if !due {
                return Ok(None);
            }
            let Some((lost, after)) = close_against(&open, id, balance) else { return Ok(None) };
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
                self.set_balance(&key, balance, after)?,
            ];
            match self.transact(actions, "a credit grant's closing").await? {
                None => {
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

    async fn refund_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        refund: CreditRefund,
    ) -> Result<Option<u64>, StoreError> {
        let key = prepaid_key(tenant, meter);
        for attempt in 0..ATTEMPTS {
            // As a close: the balance first, then its grants, and a write conditional on both
            // as read (a reserve, grant or close meanwhile makes it read again).
            let Some((balance, all)) = self.read_balance(&key).await? else { return Ok(None) };
            let open: Vec<CreditGrant> = all.into_iter().filter(|g| g.closed.is_none()).collect();
            let Some(grant) = open.iter().find(|g| g.id == id) else { return Ok(None) };
            let Some((removed, after)) = refund_against(&open, id, balance, refund) else { return Ok(None) };
            let take = Update::builder()
                .table_name(&self.table)
                .key("pk", s(credit_pk(tenant)))
                .key("sk", s(credit_sk(meter.as_str(), id)))
                .update_expression("SET units = :u, refunded = :rf")
                .condition_expression(
                    "attribute_exists(pk) AND attribute_not_exists(closed_at) AND units = :u0 \
                     AND (attribute_not_exists(refunded) OR refunded = :rf0)",
                )
                .expression_attribute_values(":u", n(grant.units - removed))
                .expression_attribute_values(":rf", n(refund.refunded))
                .expression_attribute_values(":u0", n(grant.units))
                .expression_attribute_values(":rf0", n(grant.refunded));
            let actions = vec![
                TransactWriteItem::builder().update(take.build().map_err(backend)?).build(),
                self.set_balance(&key, balance, after)?,
            ];
            match self.transact(actions, "a credit grant's refund").await? {
                None => return Ok(Some(removed)),
                Some(_) => backoff(attempt).await,
            }
        }
        Err(StoreError::Conflict("a prepaid balance changed under every attempt"))
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
    /// counter as read refuses a computation over grants read before). `None`: no balance.
    async fn read_balance(&self, key: &QuotaKey) -> Result<Option<(CreditBalance, Vec<CreditGrant>)>, StoreError> {
        let Some(counter) = self.get(quota_pk(key), &quota_sk(key)).await? else { return Ok(None) };
        let balance = CreditBalance::new(get_u(&counter, "granted"), get_u(&counter, "reserved"));
        Ok(Some((balance, self.grants(&key.tenant, Some(&key.meter)).await?)))
    }

    /// Sets a balance to `after`, only if it is still `before` (a reserve or release meanwhile
    /// makes the caller read it again).
    fn set_balance(
        &self,
        key: &QuotaKey,
        before: CreditBalance,
        after: CreditBalance,
    ) -> Result<TransactWriteItem, StoreError> {
        let room = i128::from(after.granted) - i128::from(after.reserved);
        let set = Update::builder()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .update_expression("SET granted = :g, reserved = :r, room = :room")
            .condition_expression("granted = :g0 AND reserved = :r0")
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
    if let Some(at) = get_i(item, "closed_at") {
        let revoked = item.get("revoked").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
        g.closed = Some(CreditClosure { at, revoked, lost: get_u(item, "lost") });
    }
    Some(g)
}

impl DynamoStore {
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
        let mut condition =
            "attribute_exists(pk) AND (attribute_not_exists(senders.#n) OR senders.#n.s < :seq)".to_owned();
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
            .expression_attribute_values(
                ":rec",
                AttributeValue::M(HashMap::from([
                    ("s".to_owned(), n(token.seq)),
                    ("g".to_owned(), n(granted)),
                    ("t".to_owned(), n(unix_now())),
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
            let quiet_since = unix_now() - SENDER_QUIET_SECS;
            let mut by_age: Vec<(i64, &String)> = senders
                .iter()
                .filter(|(node, _)| **node != hex_node(token.node))
                .filter_map(|(node, v)| v.as_m().ok().and_then(|m| get_i(m, "t")).map(|t| (t, node)))
                .filter(|(t, _)| *t < quiet_since)
                .collect();
            by_age.sort();
            for (i, (t, node)) in by_age.iter().take(senders.len() - SENDERS_KEPT).enumerate() {
                expr.push_str(if i == 0 { " REMOVE " } else { ", " });
                expr.push_str(&format!("senders.#d{i}"));
                condition.push_str(&format!(" AND senders.#d{i}.t = :t{i}"));
                req = req
                    .expression_attribute_names(format!("#d{i}"), (*node).clone())
                    .expression_attribute_values(format!(":t{i}"), n(t));
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
        let rec = item.get("senders")?.as_m().ok()?.get(&hex_node(token.node))?.as_m().ok()?;
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
