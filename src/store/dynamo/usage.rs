//! The usage role of the DynamoStore.

use super::race::{Race, Retries};
use super::*;

#[async_trait]
impl UsageStore for DynamoStore {
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        let now = unix_now();
        let mut actions = Vec::with_capacity(batch.records.len() + 1);
        let marker = Put::builder()
            .table_name(&self.table)
            .item("pk", s(format!("F{SEP}{}", batch.id)))
            .item("sk", s("F"))
            .item("ttl", n(now.saturating_add(FLUSH_IDS_KEPT_SECS)))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(backend)?;
        actions.push(TransactWriteItem::builder().put(marker).build());
        for r in &batch.records {
            let update = usage_update(&self.table, r)?;
            actions.push(TransactWriteItem::builder().update(update).build());
        }
        let actions = &actions;
        self.until_won(
            "a usage flush conflicted with other writes under every attempt",
            Retries::BACKING_OFF,
            (),
            |(), _| {
                Box::pin(async move {
                    match self.client.transact_write_items().set_transact_items(Some(actions.clone())).send().await {
                        Ok(_) => Ok(Race::Won(CommitOutcome::Applied)),
                        Err(e) => match cancellation(&e) {
                            Some(reasons)
                                if reasons.first().is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) =>
                            {
                                Ok(Race::Won(CommitOutcome::AlreadyApplied))
                            }
                            Some(reasons) if retryable(&reasons) => Ok(Race::Lost(())),
                            _ => Err(sdk(e)),
                        },
                    }
                })
            },
        )
        .await
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        let mut out = Vec::with_capacity(events.len());
        // A token per call and event: the SDK's own retries of a transaction whose answer was
        // lost are then answered as the first (applied), not as a duplicate; a later delivery
        // of the event, a new call, gets a new token and its condition fails (duplicate).
        let call = crate::base::draw_u64();
        for (i, e) in events.iter().enumerate() {
            let token = format!("{call:016x}{:016x}", (i as u64) ^ 0x5bd1_e995);
            let seen = Put::builder()
                .table_name(&self.table)
                .item("pk", s(format!("E{SEP}{}", e.id)))
                .item("sk", s("E"))
                .item("ttl", n(e.at.saturating_add(EVENT_IDS_KEPT_SECS)))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(backend)?;
            let r = &e.record;
            let update = usage_update(&self.table, r)?;
            let actions = vec![
                TransactWriteItem::builder().put(seen).build(),
                TransactWriteItem::builder().update(update).build(),
            ];
            let (actions, token) = (&actions, &token);
            let outcome = self.until_won(
                "a usage event conflicted with other writes under every attempt",
                Retries::BACKING_OFF,
                (),
                |(), _| {
                    Box::pin(async move {
                        let request = self
                            .client
                            .transact_write_items()
                            .set_transact_items(Some(actions.clone()))
                            .client_request_token(token);
                        match request.send().await {
                            Ok(_) => Ok(Race::Won(EventOutcome::Applied)),
                            // Another request with this token is still being applied: wait, send again.
                            Err(err)
                                if err.as_service_error().is_some_and(|e| {
                                    matches!(e, TransactWriteItemsError::TransactionInProgressException(_))
                                }) =>
                            {
                                Ok(Race::Lost(()))
                            }
                            Err(err) => match cancellation(&err) {
                                Some(reasons)
                                    if reasons
                                        .first()
                                        .is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) =>
                                {
                                    Ok(Race::Won(EventOutcome::Duplicate))
                                }
                                Some(reasons) if !retryable(&reasons) => Err(sdk(err)),
                                Some(_) => Ok(Race::Lost(())),
                                None => Err(sdk(err)),
                            },
                        }
                    })
                },
            );
            out.push(outcome.await?);
        }
        Ok(out)
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .filter_expression("#w >= :from AND #w < :to")
                .expression_attribute_names("#w", "window")
                .expression_attribute_values(":pk", s(usage_pk(tenant)))
                .expression_attribute_values(":from", n(from))
                .expression_attribute_values(":to", n(to))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            out.extend(page.items.unwrap_or_default().iter().filter_map(aggregate));
            match page.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn max_batch_records(&self) -> usize {
        MAX_BATCH_RECORDS
    }
}
