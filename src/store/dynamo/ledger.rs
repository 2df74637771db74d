//! The ledger role of the DynamoStore: what exports sent, as reconciliation reads it.

use super::*;

#[async_trait]
impl LedgerStore for DynamoStore {
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        while out.len() < limit {
            let q = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_values(":pk", s(ledger_pk(hour)))
                .limit(i32::try_from(limit - out.len()).unwrap_or(i32::MAX))
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            let q = match after {
                Some((k, r)) => q
                    .key_condition_expression("pk = :pk AND sk > :after")
                    .expression_attribute_values(":after", s(ledger_sk(k, r))),
                None => q.key_condition_expression("pk = :pk"),
            };
            let page = q.send().await.map_err(sdk)?;
            out.extend(page.items.unwrap_or_default().iter().filter_map(ledger_entry));
            match page.last_evaluated_key {
                Some(k) if out.len() < limit => start = Some(k),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError> {
        // An entry kept: the first time is kept.
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(ledger_pk(entry.hour())))
            .key("sk", s(ledger_sk(&entry.key, entry.revision)))
            .condition_expression("attribute_exists(pk)")
            .update_expression("SET lacking_since = if_not_exists(lacking_since, :now)")
            .expression_attribute_values(":now", n(now))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match out {
            Ok(o) => return Ok(o.attributes.as_ref().and_then(|a| get_i(a, "lacking_since")).unwrap_or(now)),
            Err(e) if is_ccf(&e) => {}
            Err(e) => return Err(sdk(e)),
        }
        // A dead letter under observation: an entry of its own, unless one came meanwhile.
        let mut observed = entry.clone();
        observed.exported_at = None;
        observed.lacking_since = Some(now);
        let put = self.ledger_put(&observed, now)?;
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(put.item().clone()))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match sent {
            Ok(_) => Ok(now),
            Err(e) if is_ccf(&e) => {
                let item = self.get(ledger_pk(entry.hour()), &ledger_sk(&entry.key, entry.revision)).await?;
                Ok(item.and_then(|i| get_i(&i, "lacking_since")).unwrap_or(now))
            }
            Err(e) => Err(sdk(e)),
        }
    }

    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        let (pk, sk) = (ledger_pk(entry.hour()), ledger_sk(&entry.key, entry.revision));
        let gone = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(pk.clone()))
            .key("sk", s(sk.clone()))
            .condition_expression("attribute_not_exists(exported_at)")
            .send()
            .await;
        match gone {
            Ok(_) => return Ok(()),
            Err(e) if is_ccf(&e) => {}
            Err(e) => return Err(sdk(e)),
        }
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .condition_expression("attribute_exists(pk)")
            .update_expression("REMOVE lacking_since")
            .send()
            .await;
        match out {
            Ok(_) => Ok(()),
            Err(e) if is_ccf(&e) => Ok(()),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        let key = &entry.key;
        let superseded = Update::builder()
            .table_name(&self.table)
            .key("pk", s(ledger_pk(entry.hour())))
            .key("sk", s(ledger_sk(key, entry.revision)))
            .condition_expression("attribute_exists(exported_at) AND attribute_not_exists(superseded)")
            .update_expression("SET superseded = :yes REMOVE lacking_since")
            .expression_attribute_values(":yes", AttributeValue::Bool(true))
            .build()
            .map_err(backend)?;
        // Back in line for export: the value no longer counts as exported.
        let reopened = Update::builder()
            .table_name(&self.table)
            .key("pk", s(usage_pk(&key.tenant)))
            .key("sk", s(usage_sk(key.meter.as_str(), key.window_start)))
            .condition_expression(
                "revision > :rev AND attribute_not_exists(dead) AND attribute_not_exists(in_flight) \
                 AND exported >= :v",
            )
            // A new revision: an export pass that read the aggregate before cannot begin from
            // the old `exported` (it would mark the value exported unsent).
            .update_expression(
                "SET exported = exported - :v, revision = revision + :one, gpk = :g, gsk = :k, #ttl = :ttl",
            )
            .expression_attribute_values(":one", n(1))
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":rev", n(entry.revision))
            .expression_attribute_values(":v", n(entry.send.value))
            .expression_attribute_values(":g", s("PENDING"))
            .expression_attribute_values(":k", s(usage_gsk(key)))
            .expression_attribute_values(":ttl", n(waiting_ttl(key.window_start).max(unix_now() + 14 * 86_400)))
            .build()
            .map_err(backend)?;
        let actions = vec![
            TransactWriteItem::builder().update(superseded).build(),
            TransactWriteItem::builder().update(reopened).build(),
        ];
        Ok(self.transact(actions, "a re-export conflicted with other writes under every attempt").await?.is_none())
    }
}

impl DynamoStore {
    /// The put of a ledger entry, kept (by TTL) 35 days from `now`.
    pub(super) fn ledger_put(&self, entry: &LedgerEntry, now: i64) -> Result<Put, StoreError> {
        let k = &entry.key;
        let mut put = Put::builder()
            .table_name(&self.table)
            .item("pk", s(ledger_pk(entry.hour())))
            .item("sk", s(ledger_sk(k, entry.revision)))
            .item("tenant", s(k.tenant.as_str()))
            .item("meter", s(k.meter.as_str()))
            .item("window", n(k.window_start))
            .item("revision", n(entry.revision))
            .item("send", s(entry.send.to_json()))
            .item("ttl", n(now.saturating_add(LEDGER_KEPT_SECS)));
        if let Some(at) = entry.exported_at {
            put = put.item("exported_at", n(at));
        }
        if let Some(at) = entry.lacking_since {
            put = put.item("lacking_since", n(at));
        }
        if entry.superseded {
            put = put.item("superseded", AttributeValue::Bool(true));
        }
        put.build().map_err(backend)
    }
}
/// The partition of the ledger entries stamped in the hour starting at `hour`.
pub(super) fn ledger_pk(hour: i64) -> String {
    format!("L{SEP}{}", window_text(hour))
}
/// An entry's sort key: (tenant, meter, window, revision) order.
pub(super) fn ledger_sk(key: &ExportKey, revision: u32) -> String {
    format!("{}{SEP}{revision:010}", usage_gsk(key))
}
fn ledger_entry(item: &Item) -> Option<LedgerEntry> {
    let key = ExportKey::new(get_s(item, "tenant")?.into(), get_s(item, "meter")?.into(), get_i(item, "window")?);
    let revision = u32::try_from(get_u(item, "revision")).unwrap_or(u32::MAX);
    let send = ExportSend::from_json(get_s(item, "send")?)?;
    let mut e = LedgerEntry::new(key, revision, send, get_i(item, "exported_at"));
    e.lacking_since = get_i(item, "lacking_since");
    e.superseded = matches!(item.get("superseded"), Some(AttributeValue::Bool(true)));
    Some(e)
}
