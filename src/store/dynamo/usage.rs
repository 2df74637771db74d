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
        Tally::check_all(&batch.tallies)?;
        if batch.records.len() + batch.tallies.len() > MAX_BATCH_RECORDS {
            return Err(StoreError::Backend(
                format!("a batch of more than {MAX_BATCH_RECORDS} records and tallies (one transaction)").into(),
            ));
        }
        for t in &batch.tallies {
            actions.push(TransactWriteItem::builder().update(tally_update(&self.table, t)?).build());
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

    /// Each meter's windows in `[from, to)` by a range of its sort keys (`meter SEP window`),
    /// never the tenant's whole partition: the partition's first item names its first meter,
    /// and the first item past a meter's last possible window names the next. One query per
    /// meter that has usage, and one for each meter's successor (a single item).
    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        let pk = usage_pk(tenant);
        let mut meter = self.next_meter(&pk, None).await?;
        while let Some(m) = meter {
            let (lo, hi) = (usage_sk(&m, from), usage_sk(&m, to - 1));
            let mut start: Option<Item> = None;
            loop {
                let page = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                    .expression_attribute_values(":pk", s(pk.as_str()))
                    .expression_attribute_values(":lo", s(lo.as_str()))
                    .expression_attribute_values(":hi", s(hi.as_str()))
                    .consistent_read(true)
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(sdk)?;
                let items = page.items.unwrap_or_default();
                self.reads.counted(page.scanned_count, &items);
                out.extend(items.iter().filter_map(aggregate));
                match page.last_evaluated_key {
                    Some(k) => start = Some(k),
                    None => break,
                }
            }
            meter = self.next_meter(&pk, Some(&m)).await?;
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A day's partition at a time (the fleet's minutes, or the tenants' days), by a range of
    /// its sort keys for the fleet's and one tenant's; in pages, never more than `max` items.
    async fn tallies(&self, query: &TallyQuery) -> Result<Vec<Tally>, StoreError> {
        let mut out = Vec::new();
        // At most four days' partitions: the horizon to two days ahead.
        let (from, to) = query.span(unix_now());
        if from >= to || query.max == 0 {
            return Ok(out);
        }
        let scope = match &query.scope {
            TallyRead::Fleet => TallyScope::Fleet,
            TallyRead::Tenant(t) => TallyScope::Tenant(t.clone()),
            TallyRead::Tenants => TallyScope::Tenant(TenantId::from("")),
        };
        let first_day = from.div_euclid(86_400) * 86_400;
        let mut day = first_day;
        while day < to && out.len() < query.max {
            // A tenant's tally starts on its day: a day that starts before `from` is not read.
            if !matches!(query.scope, TallyRead::Fleet) && day < from {
                day += 86_400;
                continue;
            }
            let pk = tally_pk(&scope, day);
            let base = self.client.query().table_name(&self.table).consistent_read(true);
            let base = match &query.scope {
                TallyRead::Fleet => {
                    let (lo, hi) = (from.max(day), (to - 1).min(day + 86_399));
                    base.key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                        .expression_attribute_values(":lo", s(window_text(lo)))
                        .expression_attribute_values(":hi", s(window_text(hi)))
                }
                TallyRead::Tenant(t) => base
                    .key_condition_expression("pk = :pk AND sk = :t")
                    .expression_attribute_values(":t", s(t.as_str())),
                TallyRead::Tenants => base.key_condition_expression("pk = :pk"),
            };
            let base = base.expression_attribute_values(":pk", s(pk.as_str()));
            let mut start: Option<Item> = None;
            loop {
                let left = i32::try_from(query.max - out.len()).unwrap_or(i32::MAX);
                let page = base.clone().limit(left).set_exclusive_start_key(start.take()).send().await.map_err(sdk)?;
                for item in page.items.unwrap_or_default() {
                    let Some(sk) = get_s(&item, "sk") else { continue };
                    let (scope, start) = match &query.scope {
                        TallyRead::Fleet => {
                            // `window_text`'s: the sign bit flipped.
                            let Ok(minute) = u64::from_str_radix(sk, 16) else { continue };
                            (TallyScope::Fleet, (minute ^ (1 << 63)) as i64)
                        }
                        _ => (TallyScope::Tenant(TenantId::from(sk)), day),
                    };
                    let mut counts: Vec<(String, u64)> = item
                        .iter()
                        .filter_map(|(k, v)| Some((k.strip_prefix("o_")?.to_owned(), v.as_n().ok()?.parse().ok()?)))
                        .collect();
                    counts.sort();
                    out.push(Tally::new(scope, start, counts));
                }
                match page.last_evaluated_key {
                    Some(k) if out.len() < query.max => start = Some(k),
                    _ => break,
                }
            }
            day += 86_400;
        }
        Ok(out)
    }

    fn max_batch_records(&self) -> usize {
        MAX_BATCH_RECORDS
    }
}

/// A tally added to its item: each outcome's count (`o_OUTCOME`), the item kept
/// [`TALLY_KEPT_SECS`](crate::store::contract::TALLY_KEPT_SECS) past its window's start.
fn tally_update(table: &str, t: &Tally) -> Result<Update, StoreError> {
    let day = t.start.div_euclid(86_400) * 86_400;
    let sk = match &t.scope {
        TallyScope::Fleet => window_text(t.start),
        TallyScope::Tenant(id) => id.as_str().to_owned(),
    };
    let mut adds = Vec::with_capacity(t.counts.len());
    let mut update = Update::builder()
        .table_name(table)
        .key("pk", s(tally_pk(&t.scope, day)))
        .key("sk", s(sk))
        .expression_attribute_names("#ttl", "ttl")
        .expression_attribute_values(":ttl", n(t.start.saturating_add(crate::store::contract::TALLY_KEPT_SECS)));
    for (i, (outcome, count)) in t.counts.iter().enumerate() {
        adds.push(format!("#o{i} :n{i}"));
        update = update
            .expression_attribute_names(format!("#o{i}"), format!("o_{outcome}"))
            .expression_attribute_values(format!(":n{i}"), n(count));
    }
    let expression =
        if adds.is_empty() { "SET #ttl = :ttl".to_owned() } else { format!("ADD {} SET #ttl = :ttl", adds.join(", ")) };
    update.update_expression(expression).build().map_err(backend)
}

impl DynamoStore {
    /// The meter of the first usage item in partition `pk` after every window of `after` (the
    /// partition's first, without it): one item read.
    async fn next_meter(&self, pk: &str, after: Option<&str>) -> Result<Option<String>, StoreError> {
        let query = self.client.query().table_name(&self.table).limit(1).consistent_read(true);
        let query = match after {
            // Every window's text is 16 hexadecimal digits: `g` sorts after each.
            Some(meter) => query
                .key_condition_expression("pk = :pk AND sk > :after")
                .expression_attribute_values(":after", s(format!("{meter}{SEP}g"))),
            None => query.key_condition_expression("pk = :pk"),
        };
        let page = query.expression_attribute_values(":pk", s(pk)).send().await.map_err(sdk)?;
        let items = page.items.unwrap_or_default();
        self.reads.counted(page.scanned_count, &items);
        Ok(items.first().and_then(|i| get_s(i, "sk")).and_then(|sk| sk.split_once(SEP)).map(|(m, _)| m.to_owned()))
    }

    /// What this store's usage reads ([`usage_range`](UsageStore::usage_range): the tenant's
    /// usage route, the dashboard, exports by tenant) cost since it was made, all its clones
    /// together: queries sent, items DynamoDB read, and the read units a strongly consistent
    /// query is billed for them (each query's items' size, rounded up to 4 KB, at least one).
    #[must_use]
    pub fn usage_reads(&self) -> super::DynamoReads {
        use std::sync::atomic::Ordering::Relaxed;
        super::DynamoReads {
            queries: self.reads.queries.load(Relaxed),
            items_read: self.reads.items.load(Relaxed),
            read_units: self.reads.units.load(Relaxed),
        }
    }
}
