//! The export role of the DynamoStore.

use super::*;

#[async_trait]
impl ExportStore for DynamoStore {
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        let items = self
            .index_items("gsi1", ("gpk", "PENDING"), ("gsk", after.map(usage_gsk)), limit, |q| {
                q.filter_expression(
                    "attribute_not_exists(dead) AND #w < :before \
                     AND (quantity > exported OR attribute_not_exists(exported) OR attribute_exists(in_flight))",
                )
                .expression_attribute_names("#w", "window")
                .expression_attribute_values(":before", n(window_start_before))
            })
            .await?;
        Ok(items.iter().filter_map(aggregate).collect())
    }

    async fn begin_export(
        &self,
        aggregate_: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        // An export in flight nothing of which may have reached the billing system (as read:
        // no first attempt recorded) is fixed anew, on that condition.
        let anew = aggregate_.in_flight.is_some() && aggregate_.first_attempt_at.is_none();
        let (exists, fix) = if anew {
            (
                "attribute_exists(pk) AND attribute_not_exists(first_attempt_at) AND attribute_exists(in_flight)",
                "in_flight = :q, send = :send",
            )
        } else {
            ("attribute_exists(pk)", "in_flight = if_not_exists(in_flight, :q), send = if_not_exists(send, :send)")
        };
        let out = self
            .claim_aggregate(aggregate_, claim, exists)
            .update_expression(format!(
                "SET claim_node = :node, claim_until = :until, attempts = if_not_exists(attempts, :zero) + :one, \
                 first_attempt_at = if_not_exists(first_attempt_at, :now), {fix}"
            ))
            // What the caller read: usage only grows, so never more than the stored quantity.
            .expression_attribute_values(":q", n(aggregate_.quantity))
            .expression_attribute_values(":send", s(send.to_json()))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match out {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                Ok(aggregate(&item))
            }
            Err(e) if is_ccf(&e) => Ok(None),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn defer_export(
        &self,
        aggregate_: &UsageAggregate,
        claim: &ExportClaim,
        deferral: Deferral,
    ) -> Result<bool, StoreError> {
        let out = self
            .claim_aggregate(aggregate_, claim, "attribute_exists(in_flight)")
            .update_expression(
                "SET claim_node = :node, claim_until = :until, \
                 unknown_failures = if_not_exists(unknown_failures, :zero) + :u",
            )
            .expression_attribute_values(":u", n(u32::from(deferral == Deferral::Unknown)))
            .send()
            .await;
        match out {
            Ok(_) => {}
            Err(e) if is_ccf(&e) => return Ok(false),
            Err(e) => return Err(sdk(e)),
        }
        if let Deferral::NeverSent(attempts) = deferral {
            // Only if no attempt began since (one that may have been taken keeps the time).
            let forgot = self
                .update_aggregate(&aggregate_.key)
                .condition_expression("attempts = :n AND claim_node = :node")
                .update_expression("REMOVE first_attempt_at")
                .expression_attribute_values(":n", n(attempts))
                .expression_attribute_values(":node", s(hex_node(claim.node)))
                .send()
                .await;
            if let Err(e) = forgot {
                if !is_ccf(&e) {
                    return Err(sdk(e));
                }
            }
        }
        Ok(true)
    }

    async fn finish_export(&self, aggregate_: &UsageAggregate, now: i64) -> Result<bool, StoreError> {
        let key = &aggregate_.key;
        let (pk, sk) = (usage_pk(&key.tenant), usage_sk(key.meter.as_str(), key.window_start));
        let mark = Update::builder()
            .table_name(&self.table)
            .key("pk", s(pk.clone()))
            .key("sk", s(sk.clone()))
            .condition_expression(
                "attribute_exists(in_flight) AND (revision = :rev OR (attribute_not_exists(revision) AND :rev = :zero))",
            )
            .update_expression(
                "SET exported = in_flight, revision = if_not_exists(revision, :zero) + :one, attempts = :zero, \
                 unknown_failures = :zero, #ttl = :ttl \
                 REMOVE in_flight, send, first_attempt_at, claim_node, claim_until, dead, dpk, dsk, dead_ttl",
            )
            // A dead letter confirmed by hand is a window again: waiting while usage is left,
            // the exported TTL once all is (below).
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":ttl", n(waiting_ttl(key.window_start)))
            .expression_attribute_values(":rev", n(aggregate_.revision))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .build()
            .map_err(backend)?;
        // What was sent goes in the ledger in the same transaction (the caller read it from the
        // store: begin_export's answer, or the dead letter's).
        let mut actions = vec![TransactWriteItem::builder().update(mark).build()];
        if let Some(send) = aggregate_.send.clone().filter(|s| s.customer.is_some()) {
            let entry = LedgerEntry::new(key.clone(), aggregate_.revision, send, Some(now));
            actions.push(TransactWriteItem::builder().put(self.ledger_put(&entry, now)?).build());
        }
        if self
            .transact(actions, "marking an export done conflicted with other writes under every attempt")
            .await?
            .is_some()
        {
            return Ok(false);
        }
        // Out of the export index once all is exported (a flush adding to it puts it back).
        let done = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .condition_expression("quantity = exported AND attribute_not_exists(in_flight)")
            .update_expression("REMOVE gpk, gsk SET #ttl = :ttl")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":ttl", n(exported_ttl(key.window_start)))
            .send()
            .await;
        // Best effort: the export is recorded; an aggregate left in the index is skipped by
        // the listing's filter and taken out by the next finish.
        if let Err(e) = done {
            if !is_ccf(&e) {
                tracing::debug!(error = %sdk(e), "taking an exported aggregate out of the export index failed");
            }
        }
        Ok(true)
    }

    async fn dead_letter(&self, aggregate_: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        let key = &aggregate_.key;
        let out = self
            .update_aggregate(key)
            .condition_expression(
                "attribute_exists(pk) AND (revision = :rev OR (attribute_not_exists(revision) AND :rev = :zero))",
            )
            // Kept until requeued or confirmed: never expired by the TTL.
            .update_expression("SET dead = :r, dpk = :d, dsk = :k, #ttl = :ttl, dead_ttl = :ttl")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":ttl", n(dead_letter_ttl(key.window_start)))
            .expression_attribute_values(":rev", n(aggregate_.revision))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":r", s(reason))
            .expression_attribute_values(":d", s("DEAD"))
            .expression_attribute_values(":k", s(usage_gsk(key)))
            .send()
            .await;
        match out {
            Ok(_) => Ok(()),
            Err(e) if is_ccf(&e) => Ok(()),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let items = self.index_items("gsi2", ("dpk", "DEAD"), ("dsk", after.map(usage_gsk)), limit, |q| q).await?;
        Ok(items
            .iter()
            .filter_map(|item| {
                let a = aggregate(item)?;
                let reason = get_s(item, "dead").unwrap_or_default().to_owned();
                let mut d = DeadLetter::new(a.key, a.quantity.saturating_sub(a.exported), reason);
                d.revision = a.revision;
                d.send = a.send;
                Some(d)
            })
            .collect())
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        let out = self
            .update_aggregate(key)
            .condition_expression("attribute_exists(dead)")
            .update_expression(
                "REMOVE dead, dpk, dsk, dead_ttl, in_flight, send, first_attempt_at, claim_node, claim_until \
                 SET gpk = :g, gsk = :k, attempts = :zero, unknown_failures = :zero, \
                 revision = if_not_exists(revision, :zero) + :one, #ttl = :ttl",
            )
            // Waiting for export again, for at least two weeks from now (an old letter's window
            // may be long past its 49 days).
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":ttl", n(waiting_ttl(key.window_start).max(unix_now() + 14 * 86_400)))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":g", s("PENDING"))
            .expression_attribute_values(":k", s(usage_gsk(key)))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if is_ccf(&e) => Ok(false),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn identifier_namespace(&self) -> Result<String, StoreError> {
        let item = self.get(META_PK.to_owned(), NAMESPACE_SK).await?;
        // A table made before namespaces has no such item: its identifiers as they were.
        Ok(item.as_ref().and_then(|i| get_s(i, "value")).unwrap_or_default().to_owned())
    }

    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError> {
        let condition = if current.is_empty() { "attribute_not_exists(pk) OR #v = :current" } else { "#v = :current" };
        let out = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(META_PK))
            .item("sk", s(NAMESPACE_SK))
            .item("value", s(new))
            .condition_expression(condition)
            .expression_attribute_names("#v", "value")
            .expression_attribute_values(":current", s(current))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if is_ccf(&e) => Ok(false),
            Err(e) => Err(sdk(e)),
        }
    }
}

impl DynamoStore {
    /// Gives every dead letter the TTL of a dead letter (past any horizon), so that DynamoDB
    /// never deletes it before it is requeued or confirmed: letters parked by a version of
    /// tollgate before this one kept the aggregate's TTL, and expired 35 days after their
    /// window. Run once after the upgrade (`tollgate export --repair-ttl`); running it again
    /// changes nothing. Returns how many letters it mended.
    ///
    /// # Errors
    /// The service's error; what was mended before stays mended.
    pub async fn repair_dead_letter_ttl(&self) -> Result<usize, StoreError> {
        let mut mended = 0;
        let mut after: Option<ExportKey> = None;
        loop {
            let page =
                self.index_items("gsi2", ("dpk", "DEAD"), ("dsk", after.as_ref().map(usage_gsk)), 100, |q| q).await?;
            if page.is_empty() {
                break;
            }
            let keys: Vec<ExportKey> = page.iter().filter_map(aggregate).map(|a| a.key).collect();
            // The cursor: the last readable item (an unreadable one is passed over, not an end).
            let Some(last) = keys.last().cloned() else { break };
            after = Some(last);
            for (item, key) in page.iter().filter_map(|i| aggregate(i).map(|a| (i, a.key))) {
                let want = dead_letter_ttl(key.window_start);
                if get_i(item, "ttl") == Some(want) && get_i(item, "dead_ttl") == Some(want) {
                    continue;
                }
                let out = self
                    .update_aggregate(&key)
                    .condition_expression("attribute_exists(dead)")
                    .update_expression("SET #ttl = :ttl, dead_ttl = :ttl")
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":ttl", n(want))
                    .send()
                    .await;
                match out {
                    Ok(_) => mended += 1,
                    // Requeued or confirmed meanwhile.
                    Err(e) if is_ccf(&e) => {}
                    Err(e) => return Err(sdk(e)),
                }
            }
        }
        Ok(mended)
    }

    /// An update of the usage aggregate `key`.
    pub(super) fn update_aggregate(&self, key: &ExportKey) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(usage_pk(&key.tenant)))
            .key("sk", s(usage_sk(key.meter.as_str(), key.window_start)))
    }

    /// An update of the aggregate that `claim` may take (or, `in_flight`, hold): `exists` holds,
    /// the revision read has not moved, it is not dead-lettered, no other node holds an
    /// unexpired claim; the claim's values are bound (`:node`, `:now`, `:until`).
    pub(super) fn claim_aggregate(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        exists: &str,
    ) -> UpdateItemFluentBuilder {
        self.update_aggregate(&aggregate.key)
            .condition_expression(format!(
                "{exists} AND attribute_not_exists(dead) \
                 AND (revision = :rev OR (attribute_not_exists(revision) AND :rev = :zero)) \
                 AND (attribute_not_exists(claim_node) OR claim_node = :node OR claim_until <= :now)"
            ))
            .expression_attribute_values(":rev", n(aggregate.revision))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":node", s(hex_node(claim.node)))
            .expression_attribute_values(":now", n(claim.now))
            .expression_attribute_values(":until", n(claim.until))
    }
}
