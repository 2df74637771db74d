//! The audit role of the DynamoStore. A record is two items written in one transaction with
//! its tenant's head (the last number given, compared and set): one in its tenant's partition
//! (`AUDIT␁tenant`, sorted by number: the tenant's listing and its bound), one in its month's
//! (`AUDITM␁2026-12`, sorted by time, tenant and number: the fleet's listing, a query per month
//! walked back from now). Both carry `ttl`, so DynamoDB removes them past [`AUDIT_KEPT_SECS`]
//! even if no prune runs; reads skip what is older than the query's `since` meanwhile.

use super::race::{Race, Retries};
use super::*;
use crate::store::{Actor, AuditQuery, AuditRecord, AuditStore, Setting, AUDIT_KEPT_SECS, AUDIT_PER_TENANT};

/// The sort key of a tenant's head item (above every record's, which start with `R`).
const HEAD_SK: &str = "~head";
/// How many months before the cutoff a prune looks at (the `ttl` removes the rest).
const PRUNE_MONTHS: i32 = 24;
/// The most records one prune removes.
const PRUNE_MAX: u64 = 10_000;

fn audit_pk(tenant: &TenantId) -> String {
    format!("AUDIT{SEP}{tenant}")
}

fn tenant_sk(seq: i64) -> String {
    format!("R{:020}", seq.max(0))
}

/// The class item of a tenant's `class_n`th record of kind `own` (1: made by the tenant).
fn class_sk(own: u8, class_n: i64) -> String {
    format!("C{own}{:020}", class_n.max(0))
}

/// The month of `at` (Unix milliseconds) as a year and a month (1 to 12).
fn month_of_ms(at: i64) -> (i32, u32) {
    use chrono::Datelike;
    let t = chrono::DateTime::from_timestamp_millis(at.max(0)).unwrap_or_default();
    (t.year(), t.month())
}

fn month_before((year, month): (i32, u32)) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

fn month_pk((year, month): (i32, u32)) -> String {
    format!("AUDITM{SEP}{year:04}-{month:02}")
}

fn month_sk(at: i64, tenant: &TenantId, seq: i64) -> String {
    format!("{:020}{SEP}{tenant}{SEP}{:020}", at.max(0), seq.max(0))
}

/// A record of one of its items.
fn record_of(item: &Item) -> Option<AuditRecord> {
    let actor = get_s(item, "actor")?.to_owned();
    let mut r = AuditRecord::new(
        TenantId::from(get_s(item, "tenant")?.to_owned()),
        get_i(item, "at")?,
        Actor::parse(&actor).unwrap_or(Actor::Other(actor)),
        Setting::parse(get_s(item, "setting")?),
        get_s(item, "before").map(str::to_owned),
        get_s(item, "after").map(str::to_owned),
    );
    r.seq = get_i(item, "seq")?;
    Some(r)
}

impl DynamoStore {
    /// The items of one partition `pk` with `sk` within `low..=high`, newest (highest) first,
    /// until `limit` of them pass `keep`.
    async fn audit_items(
        &self,
        pk: String,
        (low, high): (String, String),
        limit: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut found = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :low AND :high")
                .expression_attribute_values(":pk", s(pk.clone()))
                .expression_attribute_values(":low", s(low.clone()))
                .expression_attribute_values(":high", s(high.clone()))
                .scan_index_forward(false)
                .consistent_read(true)
                .limit(i32::try_from(limit.clamp(1, 500)).unwrap_or(500))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            found.extend(page.items.unwrap_or_default().iter().filter_map(record_of).filter(|r| keep(r)));
            start = page.last_evaluated_key;
            if found.len() >= limit || start.is_none() {
                return Ok(found);
            }
        }
    }

    /// Deletes the record of class item `class_n` of kind `own` in partition `pk`: the class
    /// item, then the record's two items.
    async fn audit_drop(&self, pk: &str, own: u8, class_n: i64) -> Result<(), StoreError> {
        let delete = |sk: String| {
            self.client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(pk.to_owned()))
                .key("sk", s(sk))
                .return_values(ReturnValue::AllOld)
                .send()
        };
        let class = delete(class_sk(own, class_n)).await.map_err(sdk)?;
        let Some(seq) = class.attributes.as_ref().and_then(|a| get_i(a, "seq")) else { return Ok(()) };
        let gone = delete(tenant_sk(seq)).await.map_err(sdk)?;
        if let Some(r) = gone.attributes.as_ref().and_then(record_of) {
            self.audit_delete(&r).await?;
        }
        Ok(())
    }

    /// Deletes a record's two items.
    async fn audit_delete(&self, r: &AuditRecord) -> Result<(), StoreError> {
        for (pk, sk) in
            [(audit_pk(&r.tenant), tenant_sk(r.seq)), (month_pk(month_of_ms(r.at)), month_sk(r.at, &r.tenant, r.seq))]
        {
            self.client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(pk))
                .key("sk", s(sk))
                .send()
                .await
                .map_err(sdk)?;
        }
        Ok(())
    }
}

#[async_trait]
impl AuditStore for DynamoStore {
    async fn append_audit(&self, record: &AuditRecord) -> Result<i64, StoreError> {
        let pk = audit_pk(&record.tenant);
        let ttl = record.at.div_euclid(1_000) + AUDIT_KEPT_SECS;
        let pk = &pk;
        // The records of its kind (the tenant's own, or the others') are counted apart, each
        // numbered by a class item (`C0…`/`C1…`, naming its record's number): the oldest past
        // the bound is found by its class number.
        let own = u8::from(record.actor.is_tenant());
        let (count, other) = if own == 1 { ("own", "others") } else { ("others", "own") };
        let (seq, class_n) = self
            .until_won("an audit record, appended by several writers", Retries::BACKING_OFF, (), |(), _| {
                Box::pin(async move {
                    let read = self.get(pk.clone(), HEAD_SK).await?;
                    let last = read.as_ref().and_then(|h| get_i(h, "seq"));
                    let seq = last.unwrap_or(0) + 1;
                    let class_n = read.as_ref().and_then(|h| get_i(h, count)).unwrap_or(0) + 1;
                    let kept = read.as_ref().and_then(|h| get_i(h, other)).unwrap_or(0);
                    let mut head = Put::builder()
                        .table_name(&self.table)
                        .item("pk", s(pk.clone()))
                        .item("sk", s(HEAD_SK))
                        .item("seq", n(seq))
                        .item(count, n(class_n))
                        .item(other, n(kept));
                    head = match last {
                        Some(last) => {
                            head.condition_expression("seq = :last").expression_attribute_values(":last", n(last))
                        }
                        None => head.condition_expression("attribute_not_exists(pk)"),
                    };
                    let item = |put: aws_sdk_dynamodb::types::builders::PutBuilder| {
                        let mut put = put
                            .table_name(&self.table)
                            .item("tenant", s(record.tenant.as_str()))
                            .item("seq", n(seq))
                            .item("at", n(record.at))
                            .item("actor", s(record.actor.to_stored()))
                            .item("setting", s(record.setting.as_str()))
                            .item("ttl", n(ttl));
                        if let Some(v) = &record.before {
                            put = put.item("before", s(v.clone()));
                        }
                        if let Some(v) = &record.after {
                            put = put.item("after", s(v.clone()));
                        }
                        put
                    };
                    let in_tenant = item(Put::builder()).item("pk", s(pk.clone())).item("sk", s(tenant_sk(seq)));
                    let in_month = item(Put::builder())
                        .item("pk", s(month_pk(month_of_ms(record.at))))
                        .item("sk", s(month_sk(record.at, &record.tenant, seq)));
                    let in_class = Put::builder()
                        .table_name(&self.table)
                        .item("pk", s(pk.clone()))
                        .item("sk", s(class_sk(own, class_n)))
                        .item("seq", n(seq))
                        .item("ttl", n(ttl));
                    let actions = [head, in_tenant, in_month, in_class]
                        .into_iter()
                        .map(|p| Ok(TransactWriteItem::builder().put(p.build().map_err(backend)?).build()))
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    match self.transact(actions, "an audit record").await? {
                        None => Ok(Race::Won((seq, class_n))),
                        Some(_) => Ok(Race::Lost(())),
                    }
                })
            })
            .await?;
        // The oldest of its kind past the bound: its class item, then its two items, read back
        // from the tenant's (a failure leaves them to the `ttl`, and is only logged: the
        // record is written).
        if class_n > AUDIT_PER_TENANT {
            if let Err(e) = self.audit_drop(pk, own, class_n - AUDIT_PER_TENANT).await {
                tracing::warn!(tenant = %record.tenant, error = %e,
                    "an audit record past the bound was not deleted: its ttl removes it");
            }
        }
        Ok(seq)
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = query.limit.max(1);
        if let Some(tenant) = &query.tenant {
            let high =
                query.before.as_ref().map_or_else(|| tenant_sk(i64::MAX), |c| tenant_sk(c.seq.saturating_sub(1)));
            let found = self.audit_items(audit_pk(tenant), (tenant_sk(0), high), limit, |r| query.matches(r)).await?;
            return Ok(query.finish(found));
        }
        let top = query.before.as_ref().map_or(query.now, |c| c.at.min(query.now));
        let (mut month, last) =
            (month_of_ms(top), month_of_ms(query.since.max(top.saturating_sub(AUDIT_KEPT_SECS * 1_000))));
        let high = query.before.as_ref().map_or_else(|| "~".to_owned(), |c| month_sk(c.at, &c.tenant, c.seq));
        let mut found = Vec::new();
        while found.len() < limit && month >= last {
            let low = month_sk(query.since, &TenantId::from(String::new()), 0);
            if low <= high {
                let page =
                    self.audit_items(month_pk(month), (low, high.clone()), limit - found.len(), |r| query.matches(r));
                found.extend(page.await?);
            }
            month = month_before(month);
        }
        Ok(query.finish(found))
    }

    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        // At most PRUNE_MAX records a call, read a page at a time (the `ttl` removes what a
        // call leaves; the next day's prune goes on).
        let mut gone = 0u64;
        let mut month = month_of_ms(before);
        for _ in 0..=PRUNE_MONTHS {
            let high = month_sk(before, &TenantId::from(String::new()), 0);
            loop {
                let page = self
                    .audit_items(
                        month_pk(month),
                        (month_sk(0, &TenantId::from(String::new()), 0), high.clone()),
                        100,
                        |r| r.at < before,
                    )
                    .await?;
                if page.is_empty() {
                    break;
                }
                for r in &page {
                    self.audit_delete(r).await?;
                    gone += 1;
                }
                if gone >= PRUNE_MAX {
                    return Ok(gone);
                }
            }
            month = month_before(month);
        }
        Ok(gone)
    }
}
