//! The quota role of the DynamoStore: a calendar period's counter, reserved and released by
//! conditional adds carrying each sender's last call; a tenant's own cap beside it. Prepaid
//! balances and their grants are in `credits.rs`.

use super::race::{Race, Retries};
use super::*;
pub(super) use crate::store::quota::Keeping;
use crate::{
    base::{MeterId, Period},
    store::{
        quota::{
            expire, expire_against, forgiven_by_json, forgiven_by_of, forgotten, mark, mark_after, revive, CreditRefund,
        },
        CapMode, CreditBalance, CreditClosure, CreditGrant, GrantOutcome, Kept, QuotaCounter, RefundOutcome, Release,
        SpendCap,
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
        if r.recharge != crate::store::RechargeMode::Ignored {
            // The reserve's own write first; then the tenant's recharge, beside the balance,
            // checks the balance that write left (or a later one).
            let mut plain = r.clone();
            plain.recharge = crate::store::RechargeMode::Ignored;
            let grant = Box::pin(self.reserve(&plain)).await?;
            let seen = crate::store::quota::recharge_after(r, self.recharge(&r.key, r.recharge.clone()).await)?;
            return Ok(grant.with_recharge(seen));
        }
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
        let units = within(r.limit.map_or(u64::MAX, |l| l.saturating_sub(r.owed)));
        let from = (units, Revived::No);
        self.until_won(
            "a quota counter changed under every attempt",
            Retries::QUICK_FIRST,
            from,
            |(units, revived), _| {
                Box::pin(async move {
                    let at_most = match r.limit {
                        Some(l) if units > 0 => {
                            Some(int(l.saturating_sub(r.owed).saturating_sub(r.left_needed(units))))
                        }
                        _ => None,
                    };
                    let delta = int(r.owed.saturating_add(units));
                    let kept = if revived.any() { dropped(r.kept) } else { r.kept };
                    let keeping = Keeping::after(kept, units, r.taking, r.expires_at);
                    let call = Add {
                        delta,
                        granted: units,
                        at_most,
                        at_least: None,
                        keeping,
                        revived,
                        answered: true,
                        claims: claims(r.kept),
                    };
                    Ok(match self.add(&r.key, &call, r.token).await? {
                        Ok((grant, _)) => Race::Won(grant),
                        // A late call for a period long over: nothing is left to reserve in it.
                        Err(None) if !self.ensure_counter(&r.key).await? => Race::Won(Grant::new(0, 0)),
                        Err(None) => Race::Again((units, revived)),
                        Err(Some(item)) => match Self::seen(&item, r.token) {
                            Some(grant) => Race::Won(grant),
                            None if !revived.any() => match self.revival(&r.key, r.token, &item, r.kept).await? {
                                Revived::No => {
                                    let reserved = get_u(&item, "reserved");
                                    let left =
                                        r.limit.map_or(u64::MAX, |l| l.saturating_sub(reserved.saturating_add(r.owed)));
                                    Race::Lost((within(left), revived))
                                }
                                again => Race::Again((units, again)),
                            },
                            None => {
                                let reserved = get_u(&item, "reserved");
                                let left =
                                    r.limit.map_or(u64::MAX, |l| l.saturating_sub(reserved.saturating_add(r.owed)));
                                Race::Lost((within(left), revived))
                            }
                        },
                    })
                })
            },
        )
        .await
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        // Calendar counters and reports, each counter once, go in transactions of at most 100
        // items (`release_together`); the rest, and each item a transaction did not apply,
        // alone.
        let mut seen = std::collections::HashSet::with_capacity(releases.len());
        let together: Vec<usize> = (0..releases.len())
            .filter(|i| {
                // A prepaid balance's release draws on its forgiven units (read first): alone;
                // a report of what a sender keeps (no units) adds nothing, and goes together.
                let (k, units) = (&releases[*i].key, releases[*i].units);
                (k.period != Period::Prepaid || units == 0) && seen.insert((quota_pk(k), quota_sk(k)))
            })
            .collect();
        let mut applied = vec![false; releases.len()];
        for chunk in together.chunks(TRANSACT_ITEMS_MAX) {
            for i in self.release_together(releases, chunk).await {
                applied[i] = true;
            }
        }
        let mut out = Vec::with_capacity(releases.len());
        for (r, applied) in releases.iter().zip(applied) {
            out.push(if applied { Ok(()) } else { self.release_units_of(r).await });
        }
        out
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        self.grant(grant).await
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        self.grants_and_balances(tenant, meter).await
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        self.close_grant(tenant, meter, id, revoke, now).await
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        self.refund_grant(refund).await
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
        use crate::store::{PaymentCall, PaymentRow};
        // One item: the row as JSON, and a version every write is made under (a
        // compare-and-set, sent again when another write came first).
        let pk = || payments_pk(call.tenant());
        if matches!(call, PaymentCall::Read { .. }) {
            let found = self.get(pk(), ONE_SK).await?;
            let json = found.as_ref().and_then(|item| get_s(item, "row"));
            return PaymentRow::apply_json(json, call, now).map(|(answer, _)| answer);
        }
        self.until_won("a tenant's payments, written by several webhooks at once", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let found = self.get(pk(), ONE_SK).await?;
                let json = found.as_ref().and_then(|item| get_s(item, "row"));
                let version = found.as_ref().and_then(|item| get_i(item, "ver")).unwrap_or(0);
                let (answer, row) = PaymentRow::apply_json(json, call, now)?;
                let Some(row) = row else { return Ok(Race::Won(answer)) };
                let put = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .item("pk", s(pk()))
                    .item("sk", s(ONE_SK))
                    .item("row", s(row))
                    .item("ver", n(version + 1));
                let put = if found.is_some() {
                    put.condition_expression("ver = :ver").expression_attribute_values(":ver", n(version))
                } else {
                    put.condition_expression("attribute_not_exists(pk)")
                };
                match put.send().await {
                    Ok(_) => Ok(Race::Won(answer)),
                    Err(e) if is_ccf(&e) => Ok(Race::Lost(())),
                    Err(e) => Err(sdk(e)),
                }
            })
        })
        .await
    }

    async fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<QuotaCounter>, StoreError> {
        self.quota_counters(tenant, meter).await
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        self.expired_grants(now, limit).await
    }
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
            if end < key.drops_ended_before() {
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

    /// Applies `call` to the counter of `key` for `token`'s call, at most once per token, and
    /// only if the counter stays at or under `at_most` (when given; for a prepaid balance,
    /// `at_most` is the room that must be left before the call) and the caller's reservation
    /// did not expire (or, `revived`, was revived for this call). Returns the answer (with the
    /// units used, after the reservations of other senders that expired gave theirs back) and
    /// a prepaid balance's granted units, or what the counter item held when a condition
    /// failed (`Err(Some(item))`), or `Err(None)` when the counter does not exist.
    pub(super) async fn add(
        &self,
        key: &QuotaKey,
        call: &Add,
        token: ReserveToken,
    ) -> Result<Result<(Grant, Option<u64>), Option<Item>>, StoreError> {
        let prepaid = key.period == Period::Prepaid;
        let e = AddExpr::of(key, call, token);
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .update_expression(e.update)
            .set_expression_attribute_names(Some(e.names))
            .set_expression_attribute_values(Some(e.values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let req = req.condition_expression(e.condition);
        // An item inside another node's transaction (a batch of releases) refuses the write
        // until the transaction ends: sent again shortly, a few times.
        let mut sent = req.clone().send().await;
        for attempt in 0..5u32 {
            match &sent {
                Err(e) if is_conflict(e) => {
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                    sent = req.clone().send().await;
                }
                _ => break,
            }
        }
        match sent {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                let mut reserved = get_u(&item, "reserved");
                // Other senders' reservations past their expiry give back their lease and holds.
                reserved = reserved.saturating_sub(self.expire_others(key, token, &item).await);
                self.after_add(key, token, reserved, &item).await;
                let grant = Grant::new(call.granted, reserved)
                    .with_used(used_in(&item, reserved, token))
                    .with_expired(call.revived.any());
                Ok(Ok((grant, prepaid.then(|| get_u(&item, "granted")))))
            }
            Err(e) => match e.into_service_error() {
                UpdateItemError::ConditionalCheckFailedException(c) => Ok(Err(c.item)),
                e => Err(backend(e)),
            },
        }
    }

    /// Expires the reservations of other senders the counter `item` (as `token`'s call left
    /// it) holds past their time (`store::quota::expire`): their lease and holds go back in
    /// one update, conditional on each being as read, so that each is given back once (a
    /// failed condition leaves it to the next call). Returns the units given back.
    pub(super) async fn expire_others(&self, key: &QuotaKey, token: ReserveToken, item: &Item) -> u64 {
        let caller = hex_node(token.node);
        let Some(senders) = item.get("senders").and_then(|v| v.as_m().ok()) else { return 0 };
        let mut due: Vec<(&String, u64, Keeping)> = senders
            .iter()
            .filter(|(node, _)| **node != caller)
            .filter_map(|(node, v)| v.as_m().ok().map(|m| (node, get_u(m, "s"), keeping_of(m))))
            .collect();
        // Those that expire now (one expired before and not yet told keeps its mark).
        let was: Vec<u64> = due.iter().map(|(_, _, k)| k.gone).collect();
        let prepaid = key.period == Period::Prepaid;
        // A prepaid balance: each expiry draws first on what is forgiven to its sender.
        let forgiven = get_u(item, "forgiven");
        let mut by = forgiven_by_of(get_s(item, "forgiven_by").unwrap_or("{}"));
        let (back, left) = if prepaid {
            let reserved = get_u(item, "reserved");
            let held = (reserved, forgiven, get_i(item, "forgiven_until").unwrap_or(0));
            let named = due.iter_mut().map(|(n, seq, k)| ((*n).clone(), *seq, k));
            let (after, left) = expire_against(named, token.at, held, &mut by);
            (reserved - after, left)
        } else {
            (expire(due.iter_mut().map(|(_, _, k)| k), token.at), forgiven)
        };
        let now_gone: Vec<&(&String, u64, Keeping)> =
            due.iter().zip(&was).filter(|((_, _, k), was)| k.gone != **was).map(|(d, _)| d).collect();
        if now_gone.is_empty() {
            return 0;
        }
        let mut expr =
            if prepaid { "ADD reserved :nb, room :b SET ".to_owned() } else { "ADD reserved :nb SET ".to_owned() };
        let mut condition = "attribute_exists(pk)".to_owned();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .expression_attribute_values(":nb", n(-int(back)))
            .expression_attribute_values(":z", n(0));
        if prepaid {
            req = req.expression_attribute_values(":b", n(int(back)));
            if left != forgiven {
                expr.push_str("forgiven = :f, forgiven_by = :fb, ");
                condition.push_str(" AND (attribute_not_exists(forgiven) OR forgiven = :f0)");
                req = req
                    .expression_attribute_values(":f", n(left))
                    .expression_attribute_values(":fb", s(forgiven_by_json(&by)))
                    .expression_attribute_values(":f0", n(forgiven));
            }
        }
        for (i, (node, seq, k)) in now_gone.into_iter().enumerate() {
            if i > 0 {
                expr.push_str(", ");
            }
            expr.push_str(&format!(
                "senders.#e{i}.x = :g{i}, senders.#e{i}.l = :z, senders.#e{i}.h = :z, senders.#e{i}.j = :z"
            ));
            condition.push_str(&format!(
                " AND senders.#e{i}.s = :s{i} AND (attribute_not_exists(senders.#e{i}.x) OR senders.#e{i}.x <= :z)"
            ));
            req = req
                .expression_attribute_names(format!("#e{i}"), (*node).clone())
                .expression_attribute_values(format!(":g{i}"), n(k.gone))
                .expression_attribute_values(format!(":s{i}"), n(*seq));
        }
        match req.update_expression(expr).condition_expression(condition).send().await {
            Ok(_) => back,
            Err(e) => {
                if !is_ccf(&e) {
                    tracing::debug!(error = %sdk(e), "expiring quota reservations failed: the next call does it");
                }
                0
            }
        }
    }

    /// How a call that failed its condition is sent again, by what the counter `item`
    /// remembers of its sender (`store::quota::standing`): revived when the store gave its
    /// reservation back (its expiry not yet told is revived here, `revive_sender`; a record
    /// left to be told by a release; no record of a sender that says it keeps units).
    pub(super) async fn revival(
        &self,
        key: &QuotaKey,
        token: ReserveToken,
        item: &Item,
        kept: Kept,
    ) -> Result<Revived, StoreError> {
        let rec = item
            .get("senders")
            .and_then(|v| v.as_m().ok())
            .and_then(|m| m.get(&hex_node(token.node)))
            .and_then(|v| v.as_m().ok());
        Ok(match rec {
            None if claims(kept) => Revived::Unknown,
            None => Revived::No,
            Some(rec) if get_i(rec, "x") == Some(mark::TELL) => Revived::Known,
            Some(_) if self.revive_sender(key, token, item, kept).await? => Revived::Known,
            Some(_) => Revived::No,
        })
    }

    /// Revives the caller's reservation, expired and given back (its record `gone`) while it
    /// was cut off (`store::quota::revive`): what it used since its last call (`gone` less
    /// what it says it keeps, `kept`) is owed again, its record keeps only its jobs, marked
    /// revived for the call sent again. Whether it was revived here.
    pub(super) async fn revive_sender(
        &self,
        key: &QuotaKey,
        token: ReserveToken,
        item: &Item,
        kept: Kept,
    ) -> Result<bool, StoreError> {
        let node = hex_node(token.node);
        let Some(rec) =
            item.get("senders").and_then(|v| v.as_m().ok()).and_then(|m| m.get(&node)).and_then(|v| v.as_m().ok())
        else {
            return Ok(false);
        };
        let keeping = keeping_of(rec);
        let Some((owed, _)) = revive(&keeping, kept) else { return Ok(false) };
        let prepaid = key.period == Period::Prepaid;
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .update_expression(if prepaid {
                "ADD reserved :o, room :no SET senders.#n.x = :m1, senders.#n.l = :z, senders.#n.h = :z"
            } else {
                "ADD reserved :o SET senders.#n.x = :m1, senders.#n.l = :z, senders.#n.h = :z"
            })
            .condition_expression("senders.#n.s = :s AND senders.#n.x = :g")
            .expression_attribute_names("#n", node)
            .expression_attribute_values(":o", n(owed))
            .expression_attribute_values(":m1", n(-1))
            .expression_attribute_values(":z", n(0))
            .expression_attribute_values(":s", n(get_u(rec, "s")))
            .expression_attribute_values(":g", n(keeping.gone));
        if prepaid {
            req = req.expression_attribute_values(":no", n(-int(owed)));
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_ccf(&e) => Ok(false),
            Err(e) => Err(sdk(e)),
        }
    }

    /// The calendar releases at `batch` (of `releases`, each counter once) in one
    /// `TransactWriteItems`, each item the conditional add a release makes alone; the indexes
    /// applied. DynamoDB cancels a transaction whole when one item's condition fails (a counter
    /// missing, a reservation to expire first, a token seen already): the items its reasons do
    /// not name go again together (at most three times), and the named ones are left to the
    /// caller, which sends each alone. Sent again after a lost answer, an item applied already
    /// fails its condition (its token is seen) and, alone, is answered as applied.
    async fn release_together(&self, releases: &[Release], batch: &[usize]) -> Vec<usize> {
        let mut left: Vec<usize> = batch.to_vec();
        for _ in 0..3 {
            if left.is_empty() {
                break;
            }
            let items: Vec<TransactWriteItem> =
                left.iter().filter_map(|i| Self::release_item(&self.table, &releases[*i])).collect();
            if items.len() != left.len() {
                return Vec::new();
            }
            match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
                Ok(_) => return left,
                Err(e) => match cancellation(&e) {
                    Some(reasons) if reasons.len() == left.len() => {
                        left = left.iter().zip(&reasons).filter(|(_, why)| why.is_none()).map(|(i, _)| *i).collect();
                    }
                    _ => return Vec::new(),
                },
            }
        }
        Vec::new()
    }

    /// A calendar release as one item of a transaction (the add `release_units_of` makes
    /// first), or `None` when the SDK refuses to build it.
    fn release_item(table: &str, r: &Release) -> Option<TransactWriteItem> {
        let call = Add {
            delta: -int(r.units),
            granted: 0,
            at_most: None,
            at_least: Some(int(r.units)),
            keeping: Keeping::after(r.kept, 0, 0, r.expires_at),
            revived: Revived::No,
            answered: false,
            claims: claims(Kept { lease: r.kept.lease.saturating_add(r.units), ..r.kept }),
        };
        let e = AddExpr::of(&r.key, &call, r.token);
        let update = Update::builder()
            .table_name(table)
            .key("pk", s(quota_pk(&r.key)))
            .key("sk", s(quota_sk(&r.key)))
            .update_expression(e.update)
            .condition_expression(e.condition)
            .set_expression_attribute_names(Some(e.names))
            .set_expression_attribute_values(Some(e.values))
            .build()
            .ok()?;
        Some(TransactWriteItem::builder().update(update).build())
    }

    /// Gives back `r.units` of a calendar counter (a prepaid balance's release draws on its
    /// forgiven units: `release_prepaid`), never below zero.
    pub(super) async fn release_units_of(&self, r: &Release) -> Result<(), StoreError> {
        if r.key.period == Period::Prepaid {
            return self.release_prepaid(r).await;
        }
        let (key, token) = (&r.key, r.token);
        // What it kept before the release (a revived sender's units went back at its expiry).
        let before = Kept { lease: r.kept.lease.saturating_add(r.units), ..r.kept };
        self.until_won(
            "a quota counter changed under every attempt",
            Retries::AT_ONCE,
            (r.units, Revived::No),
            |(units, revived), _| {
                Box::pin(async move {
                    let kept = if revived.any() { dropped(r.kept) } else { r.kept };
                    let keeping = Keeping::after(kept, 0, 0, r.expires_at);
                    let give = if revived.any() { 0 } else { units };
                    let call = Add {
                        delta: -int(give),
                        granted: 0,
                        at_most: None,
                        at_least: Some(int(give)),
                        keeping,
                        revived,
                        answered: false,
                        claims: claims(before),
                    };
                    // Never below zero: at most what the counter holds is given back.
                    Ok(match self.add(key, &call, token).await? {
                        Ok(_) => Race::Won(()),
                        Err(None) if !self.ensure_counter(key).await? => Race::Won(()),
                        Err(None) => Race::Lost((units, revived)),
                        Err(Some(item)) if Self::seen(&item, token).is_some() => Race::Won(()),
                        Err(Some(item)) if !revived.any() => match self.revival(key, token, &item, before).await? {
                            Revived::No => Race::Lost((units.min(get_u(&item, "reserved")), revived)),
                            again => Race::Again((units, again)),
                        },
                        Err(Some(item)) => Race::Lost((units.min(get_u(&item, "reserved")), revived)),
                    })
                })
            },
        )
        .await
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
                // A live reservation is never forgotten: it expires first.
                .filter(|(_, v)| {
                    !v.as_m().is_ok_and(|m| keeping_of(m).unforgettable(get_i(m, "t").unwrap_or(i64::MIN), token.at))
                })
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
                // Answered as it was, an expiry told included.
                Grant::new(get_u(rec, "g"), rec.get("r").map_or(reserved, |_| get_u(rec, "r")))
                    .with_expired(get_i(rec, "x") == Some(mark::TOLD))
            } else {
                Grant::new(0, reserved)
            }
        })
    }
}

/// [`NEW_CALL`]'s `:newer`: a call dated `at` is new to a counter whose last sender forgotten
/// is dated before this (the rule's slack, `contract::FORGOTTEN_SLACK_SECS`).
pub(super) fn newer(at: i64) -> i64 {
    at.saturating_sub(crate::store::contract::FORGOTTEN_SLACK_SECS)
}

/// The condition that `#n`'s call with `:seq` is new: its sender's last call is older, or its
/// sender is not remembered and it is dated later than every sender forgotten, by more than
/// the slack (`:newer`, [`newer`]; `store::quota::forgotten`).
pub(super) const NEW_CALL: &str =
    "((attribute_not_exists(senders.#n) AND (attribute_not_exists(forgotten_at) OR forgotten_at < :newer)) \
     OR senders.#n.s < :seq)";

/// One conditional add of a quota call ([`DynamoStore::add`]).
pub(super) struct Add {
    /// Added to the counter (negative to release).
    pub(super) delta: i64,
    /// Units granted to the caller (recorded to answer a retry).
    pub(super) granted: u64,
    pub(super) at_most: Option<i64>,
    pub(super) at_least: Option<i64>,
    /// What the caller keeps after the call.
    pub(super) keeping: Keeping,
    /// Whether the store gave the caller's reservation back, and how it knows.
    pub(super) revived: Revived,
    /// Whether the caller reads the answer (false: a release).
    pub(super) answered: bool,
    /// Whether the caller says it kept leased or held units before the call: a counter that
    /// does not remember it gave them back (`store::quota::standing`).
    pub(super) claims: bool,
}

/// Whether a call's sender had its reservation given back (`store::quota::standing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Revived {
    No,
    /// Its record says so (revived by `revive_sender`, or left to be told by a release).
    Known,
    /// The counter does not remember it, and it says it keeps units.
    Unknown,
}

impl Revived {
    pub(super) fn any(self) -> bool {
        self != Self::No
    }
}

/// Whether a caller keeping `kept` before its call says it keeps leased or held units.
pub(super) fn claims(kept: Kept) -> bool {
    kept.lease.saturating_add(kept.held) > 0
}

/// The update and condition of an [`Add`] (one `UpdateItem`, or one item of a transaction).
pub(super) struct AddExpr {
    pub(super) update: &'static str,
    pub(super) condition: String,
    pub(super) names: HashMap<String, String>,
    pub(super) values: HashMap<String, AttributeValue>,
}

impl AddExpr {
    pub(super) fn of(key: &QuotaKey, call: &Add, token: ReserveToken) -> Self {
        let prepaid = key.period == Period::Prepaid;
        let mut condition = format!("attribute_exists(pk) AND {NEW_CALL}");
        let mark = mark_after(call.revived.any(), call.answered);
        let mut values = HashMap::from([
            (":d".to_owned(), n(call.delta)),
            (":seq".to_owned(), n(token.seq)),
            (":newer".to_owned(), n(newer(token.at))),
            (":rec".to_owned(), record(token, call.granted, &call.keeping, mark)),
        ]);
        match call.revived {
            Revived::Known => {
                condition.push_str(" AND senders.#n.x = :revived");
                values.insert(":revived".to_owned(), n(mark::TELL));
            }
            Revived::Unknown => condition.push_str(" AND attribute_not_exists(senders.#n)"),
            Revived::No => {
                condition.push_str(
                    " AND (attribute_not_exists(senders.#n.x) OR senders.#n.x = :zero OR senders.#n.x = :told)",
                );
                values.insert(":zero".to_owned(), n(mark::NONE));
                values.insert(":told".to_owned(), n(mark::TOLD));
                if call.claims {
                    condition.push_str(" AND attribute_exists(senders.#n)");
                }
            }
        }
        if prepaid {
            values.insert(":nd".to_owned(), n(call.delta.saturating_neg()));
        }
        if let Some(at_most) = call.at_most {
            condition.push_str(if prepaid { " AND room >= :max" } else { " AND reserved <= :max" });
            values.insert(":max".to_owned(), n(at_most));
        }
        if let Some(at_least) = call.at_least {
            condition.push_str(" AND reserved >= :min");
            values.insert(":min".to_owned(), n(at_least));
        }
        Self {
            update: if prepaid {
                "ADD reserved :d, room :nd SET senders.#n = :rec"
            } else {
                "ADD reserved :d SET senders.#n = :rec"
            },
            condition,
            names: HashMap::from([("#n".to_owned(), hex_node(token.node))]),
            values,
        }
    }
}

/// What a revived sender keeps: its jobs alone (`store::quota::revive`).
pub(super) fn dropped(kept: Kept) -> Kept {
    Kept { jobs: kept.jobs, ..Kept::default() }
}

/// A sender's record of `token`'s call in the counter item's `senders` map: its sequence
/// number, grant and time, and the reservation it keeps (`l`, `h`, `j`, `e`; `x` what its
/// expiry gave back, −1 revived).
pub(super) fn record(token: ReserveToken, granted: u64, keeping: &Keeping, mark: i64) -> AttributeValue {
    AttributeValue::M(HashMap::from([
        ("s".to_owned(), n(token.seq)),
        ("g".to_owned(), n(granted)),
        ("t".to_owned(), n(token.at)),
        ("l".to_owned(), n(keeping.kept.lease)),
        ("h".to_owned(), n(keeping.kept.held)),
        ("j".to_owned(), n(keeping.kept.jobs)),
        ("e".to_owned(), n(keeping.expires_at)),
        ("x".to_owned(), n(mark)),
    ]))
}

/// The reservation a sender's record holds (none, never expiring, in records of earlier
/// builds).
pub(super) fn keeping_of(rec: &Item) -> Keeping {
    Keeping {
        kept: Kept::new(get_u(rec, "l"), get_u(rec, "h"), get_u(rec, "j")),
        expires_at: get_i(rec, "e").unwrap_or(0),
        gone: u64::try_from(get_i(rec, "x").unwrap_or(0)).unwrap_or(0),
    }
}

/// What the senders of a counter item keep together (expired ones keep nothing).
pub(super) fn kept_in(item: &Item) -> Kept {
    let senders = item.get("senders").and_then(|v| v.as_m().ok());
    let keepings: Vec<Keeping> =
        senders.into_iter().flatten().filter_map(|(_, v)| v.as_m().ok().map(keeping_of)).collect();
    crate::store::quota::kept_of(keepings.iter().filter(|k| k.gone == 0))
}

/// The units used of `reserved` as the counter `item` (after `token`'s call, expired
/// reservations given back) says: less what its live senders keep.
fn used_in(item: &Item, reserved: u64, token: ReserveToken) -> u64 {
    let senders = item.get("senders").and_then(|v| v.as_m().ok());
    let mut keepings: Vec<Keeping> =
        senders.into_iter().flatten().filter_map(|(_, v)| v.as_m().ok().map(keeping_of)).collect();
    let _ = expire(keepings.iter_mut(), token.at);
    crate::store::quota::used_of(reserved, keepings.iter())
}
