//! The alerts role of the DynamoStore: the outbox as one item per alert and destination (in
//! the partition `AL`), each read consistently and written back under a condition on its
//! version; a pending row also has an item in the queue partition `AQ`, sorted by when it is
//! due, which claims read instead of the whole outbox.

use super::race::{Race, Retries};
use super::*;
use crate::store::{AlertClaim, AlertKey, AlertOutcome, AlertQuery, AlertState, OutboxEntry, OutboxStore};

/// The partition of outbox rows (sort key: id, destination).
const ROWS_PK: &str = "AL";
/// The partition of pending rows' queue items (sort key: due time, id, destination).
const QUEUE_PK: &str = "AQ";

fn row_sk(key: &AlertKey) -> String {
    format!("{}{SEP}{}", key.id, key.destination)
}

fn queue_sk(next_at: i64, key: &AlertKey) -> String {
    format!("{}{SEP}{}{SEP}{}", window_text(next_at), key.id, key.destination)
}

/// A row as stored, with its version.
fn entry(item: &Item) -> Option<(OutboxEntry, i64)> {
    let sk = get_s(item, "sk")?;
    let (id, destination) = sk.split_once(SEP)?;
    let mut e = OutboxEntry::new(
        AlertKey::new(id, destination),
        TenantId::from(get_s(item, "tenant")?),
        get_s(item, "ev")?,
        get_s(item, "body")?,
        get_i(item, "created")?,
        get_i(item, "keep")?,
    );
    e.state = AlertState::parse(get_s(item, "st")?).unwrap_or(AlertState::Dead);
    e.attempts = u32::try_from(get_i(item, "att").unwrap_or(0)).unwrap_or(u32::MAX);
    e.next_at = get_i(item, "nx").unwrap_or(0);
    // The owner is a node id: its bits, as a signed number (half of all ids are past i64::MAX).
    e.claim = (get_i(item, "co").unwrap_or(0) as u64, get_i(item, "cu").unwrap_or(0));
    e.last_error = get_s(item, "err").map(str::to_owned);
    e.delivered_at = get_i(item, "dat");
    Some((e, get_i(item, "ver").unwrap_or(0)))
}

impl DynamoStore {
    /// The put of `e` as version `ver`: over version `ver - 1`, or new (`ver == 1`).
    fn alert_put(&self, e: &OutboxEntry, ver: i64) -> Result<Put, StoreError> {
        let mut put = Put::builder()
            .table_name(&self.table)
            .item("pk", s(ROWS_PK))
            .item("sk", s(row_sk(&e.key)))
            .item("tenant", s(e.tenant.as_str()))
            .item("ev", s(e.event.as_str()))
            .item("body", s(e.body.as_str()))
            .item("created", n(e.created_at))
            .item("keep", n(e.keep_until))
            .item("st", s(e.state.as_str()))
            .item("att", n(e.attempts))
            .item("nx", n(e.next_at))
            .item("co", n(e.claim.0 as i64))
            .item("cu", n(e.claim.1))
            .item("ver", n(ver))
            // Deleted by DynamoDB some time after it may be pruned (a pending row never is).
            .item("ttl", n(if e.state == AlertState::Pending { i64::MAX / 2 } else { e.keep_until.max(0) + 86_400 }));
        if let Some(err) = &e.last_error {
            put = put.item("err", s(err.as_str()));
        }
        if let Some(at) = e.delivered_at {
            put = put.item("dat", n(at));
        }
        put = if ver <= 1 {
            put.condition_expression("attribute_not_exists(pk)")
        } else {
            put.condition_expression("ver = :ver").expression_attribute_values(":ver", n(ver - 1))
        };
        put.build().map_err(backend)
    }

    fn queue_put(&self, e: &OutboxEntry) -> Result<Put, StoreError> {
        Put::builder()
            .table_name(&self.table)
            .item("pk", s(QUEUE_PK))
            .item("sk", s(queue_sk(e.next_at, &e.key)))
            .build()
            .map_err(backend)
    }

    fn queue_delete(&self, next_at: i64, key: &AlertKey) -> Result<aws_sdk_dynamodb::types::Delete, StoreError> {
        aws_sdk_dynamodb::types::Delete::builder()
            .table_name(&self.table)
            .key("pk", s(QUEUE_PK))
            .key("sk", s(queue_sk(next_at, key)))
            .build()
            .map_err(backend)
    }

    async fn alert_row(&self, key: &AlertKey) -> Result<Option<(OutboxEntry, i64)>, StoreError> {
        Ok(self.get(ROWS_PK.to_owned(), &row_sk(key)).await?.as_ref().and_then(entry))
    }

    /// Writes `after` over `before` (version `ver`) with the queue item moved as its state and
    /// due time say: `false` when another write came first.
    async fn alert_write(&self, before: &OutboxEntry, after: &OutboxEntry, ver: i64) -> Result<bool, StoreError> {
        let mut actions = vec![TransactWriteItem::builder().put(self.alert_put(after, ver + 1)?).build()];
        let queued = |e: &OutboxEntry| e.state == AlertState::Pending;
        if queued(before) && !(queued(after) && after.next_at == before.next_at) {
            actions.push(TransactWriteItem::builder().delete(self.queue_delete(before.next_at, &before.key)?).build());
        }
        if queued(after) && !(queued(before) && after.next_at == before.next_at) {
            actions.push(TransactWriteItem::builder().put(self.queue_put(after)?).build());
        }
        let out = self.client.transact_write_items().set_transact_items(Some(actions)).send().await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if cancelled_by_condition(&e) => Ok(false),
            Err(e) => Err(sdk(e)),
        }
    }

    /// Applies `change` to the row of `key` and writes it back, read again when another write
    /// came first.
    async fn change_alert(
        &self,
        key: &AlertKey,
        change: impl Fn(&mut OutboxEntry) -> bool + Sync,
    ) -> Result<bool, StoreError> {
        let change = &change;
        self.until_won("an alert, written by other nodes all along", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let Some((before, ver)) = self.alert_row(key).await? else { return Ok(Race::Won(false)) };
                let mut after = before.clone();
                if !change(&mut after) {
                    return Ok(Race::Won(false));
                }
                Ok(if self.alert_write(&before, &after, ver).await? { Race::Won(true) } else { Race::Lost(()) })
            })
        })
        .await
    }
}

/// Whether a transaction was cancelled by one of its conditions (and nothing else).
fn cancelled_by_condition<R>(e: &SdkError<TransactWriteItemsError, R>) -> bool {
    match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
            let reasons = c.cancellation_reasons();
            !reasons.is_empty()
                && reasons.iter().any(|r| r.code() == Some("ConditionalCheckFailed"))
                && reasons.iter().all(|r| matches!(r.code(), None | Some("None" | "ConditionalCheckFailed")))
        }
        _ => false,
    }
}

#[async_trait]
impl OutboxStore for DynamoStore {
    async fn put_alerts(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError> {
        let mut written = 0;
        for e in entries {
            let mut actions = vec![TransactWriteItem::builder().put(self.alert_put(e, 1)?).build()];
            if e.state == AlertState::Pending {
                actions.push(TransactWriteItem::builder().put(self.queue_put(e)?).build());
            }
            match self.client.transact_write_items().set_transact_items(Some(actions)).send().await {
                Ok(_) => written += 1,
                // There already: put-if-absent.
                Err(err) if cancelled_by_condition(&err) => {}
                Err(err) => return Err(sdk(err)),
            }
        }
        Ok(written)
    }

    async fn claim_alerts(&self, claim: &AlertClaim) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut claimed = Vec::new();
        let mut start: Option<Item> = None;
        // Due items sort first; claimed ones stay queued until settled, so a page may hold
        // some: read on, a few pages at most.
        for _ in 0..8 {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk < :due")
                .expression_attribute_values(":pk", s(QUEUE_PK))
                .expression_attribute_values(":due", s(window_text(claim.now.saturating_add(1))))
                .limit(i32::try_from(claim.limit.saturating_mul(2).clamp(1, 1_000)).unwrap_or(1_000))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            for item in page.items.unwrap_or_default() {
                if claimed.len() >= claim.limit {
                    return Ok(claimed);
                }
                let Some(sk) = get_s(&item, "sk") else { continue };
                let mut parts = sk.splitn(3, SEP);
                let (Some(_), Some(id), Some(destination)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let key = AlertKey::new(id, destination);
                let Some((before, ver)) = self.alert_row(&key).await? else { continue };
                if !before.claimable(claim.now) {
                    continue;
                }
                let mut after = before.clone();
                after.claimed(claim.owner, claim.until);
                // Lost to another claim: it holds the row.
                if self.alert_write(&before, &after, ver).await? {
                    claimed.push(after);
                }
            }
            match page.last_evaluated_key {
                Some(k) if claimed.len() < claim.limit => start = Some(k),
                _ => break,
            }
        }
        Ok(claimed)
    }

    async fn settle_alert(&self, key: &AlertKey, owner: u64, outcome: &AlertOutcome) -> Result<bool, StoreError> {
        self.change_alert(key, |e| e.settle(owner, outcome)).await
    }

    async fn list_alerts(&self, query: &AlertQuery) -> Result<Vec<OutboxEntry>, StoreError> {
        let limit = query.limit.max(1);
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let q = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_values(":pk", s(ROWS_PK))
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            let q = match (&query.id, &query.after) {
                (Some(id), _) => q
                    .key_condition_expression("pk = :pk AND begins_with(sk, :id)")
                    .expression_attribute_values(":id", s(format!("{id}{SEP}"))),
                (None, Some(after)) => q
                    .key_condition_expression("pk = :pk AND sk > :after")
                    .expression_attribute_values(":after", s(row_sk(after))),
                (None, None) => q.key_condition_expression("pk = :pk"),
            };
            let page = q.send().await.map_err(sdk)?;
            out.extend(
                page.items.unwrap_or_default().iter().filter_map(entry).map(|(e, _)| e).filter(|e| query.matches(e)),
            );
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn requeue_alert(&self, key: &AlertKey, now: i64) -> Result<bool, StoreError> {
        self.change_alert(key, |e| e.requeue(now)).await
    }

    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError> {
        let mut gone = 0;
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(ROWS_PK))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            for (e, ver) in page.items.unwrap_or_default().iter().filter_map(entry) {
                if !e.prunable(now) {
                    continue;
                }
                let out = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .key("pk", s(ROWS_PK))
                    .key("sk", s(row_sk(&e.key)))
                    .condition_expression("ver = :ver")
                    .expression_attribute_values(":ver", n(ver))
                    .send()
                    .await;
                match out {
                    Ok(_) => gone += 1,
                    Err(err) if is_ccf(&err) => {}
                    Err(err) => return Err(sdk(err)),
                }
            }
            match page.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        Ok(gone)
    }
}
