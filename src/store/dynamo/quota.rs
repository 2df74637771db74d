//! The quota role of the DynamoStore.

use super::*;

#[async_trait]
impl QuotaStore for DynamoStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
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
                Ok(reserved) => return Ok(Grant::new(units, reserved)),
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
        for old in items.iter().filter(|i| get_s(i, "sk") != Some("FLOOR")) {
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
        let created = self
            .client
            .put_item()
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
    /// once per token, and only if the counter stays at or under `at_most` (when given).
    /// Returns the counter after the call, or what the counter item held when a condition
    /// failed (`Err(Some(item))`), or `Err(None)` when the counter does not exist.
    pub(super) async fn add(
        &self,
        key: &QuotaKey,
        delta: i64,
        granted: u64,
        at_most: Option<i64>,
        at_least: Option<i64>,
        token: ReserveToken,
    ) -> Result<Result<u64, Option<Item>>, StoreError> {
        let mut condition =
            "attribute_exists(pk) AND (attribute_not_exists(senders.#n) OR senders.#n.s < :seq)".to_owned();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(quota_pk(key)))
            .key("sk", s(quota_sk(key)))
            .update_expression("ADD reserved :d SET senders.#n = :rec")
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
        if let Some(at_most) = at_most {
            condition.push_str(" AND reserved <= :max");
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
                Ok(Ok(reserved))
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
