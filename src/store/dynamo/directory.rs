//! The directory role of the DynamoStore.

use super::race::{Race, Retries};
use super::*;
use crate::store::{ChangeCall, Changes, KeyWrite, TenantChange};

#[async_trait]
impl DirectoryStore for DynamoStore {
    async fn changes(&self, call: ChangeCall<'_>) -> Result<Changes, StoreError> {
        // One item: the feed as JSON (`[[tenant, at, stamp], …]`, at most about 43 KB with
        // 128-character tenant ids), its
        // floor, and a version every tell writes under (a compare-and-set).
        let pk = || String::from(CHANGES_PK);
        let decode = |item: &Item| -> Result<Changes, StoreError> {
            let entries: Vec<(String, i64, i64)> = match get_s(item, "feed") {
                Some(json) => serde_json::from_str(json)
                    .map_err(|e| StoreError::Unusable(format!("the feed of tenants changed cannot be read: {e}")))?,
                None => Vec::new(),
            };
            let tenants = entries.into_iter().map(|(t, at, stamp)| TenantChange::new(TenantId::new(t), at, stamp));
            Ok(Changes::new(tenants.collect(), get_i(item, "floor").unwrap_or(0)))
        };
        let ChangeCall::Tell { tenant, at } = call else {
            return match self.get(pk(), ONE_SK).await? {
                Some(item) => decode(&item),
                None => Ok(Changes::default()),
            };
        };
        let decode = &decode;
        self.until_won("the feed of tenants changed, told by several writers", Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let found = self.get(pk(), ONE_SK).await?;
                let (mut feed, version) = match &found {
                    Some(item) => (decode(item)?, get_i(item, "ver").unwrap_or(0)),
                    None => (Changes::default(), 0),
                };
                feed.tell(tenant, at);
                let entries: Vec<(&str, i64, i64)> =
                    feed.tenants.iter().map(|c| (c.tenant.as_str(), c.at, c.stamp)).collect();
                let json = serde_json::to_string(&entries).map_err(|e| StoreError::Backend(Box::new(e)))?;
                let put = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .item("pk", s(pk()))
                    .item("sk", s(ONE_SK))
                    .item("feed", s(json))
                    .item("floor", n(feed.floor))
                    .item("ver", n(version + 1));
                let put = if found.is_some() {
                    put.condition_expression("attribute_not_exists(ver) OR ver = :ver")
                        .expression_attribute_values(":ver", n(version))
                } else {
                    put.condition_expression("attribute_not_exists(pk)")
                };
                match put.send().await {
                    Ok(_) => Ok(Race::Won(Changes::default())),
                    Err(e) if is_ccf(&e) => Ok(Race::Lost(())),
                    Err(e) => Err(sdk(e)),
                }
            })
        })
        .await
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        let after = after.map(|t| t.as_str().to_owned());
        let items = self.index_items("gsi1", ("gpk", "TENANT"), ("gsk", after), limit, |q| q).await?;
        Ok(items.iter().filter_map(tenant_record).collect())
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        let Some(link) = self.get(customer_pk(customer), "C").await? else { return Ok(None) };
        let Some(tenant) = get_s(&link, "tenant") else { return Ok(None) };
        let record = self.tenant(&tenant.into()).await?;
        // The link is the customer's only if the tenant still names it.
        Ok(record.filter(|t| t.customer.as_deref() == Some(customer)))
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        let marker_pk = format!("W{SEP}{}", change.event_id);
        if self.get(marker_pk.clone(), "W").await?.is_some() {
            return Ok(PlanChangeOutcome::Duplicate);
        }
        let Some(mut record) = self.tenant_by_customer(&change.customer).await? else {
            return Ok(PlanChangeOutcome::UnknownCustomer);
        };
        let marker = || {
            Put::builder()
                .table_name(&self.table)
                .item("pk", s(marker_pk.clone()))
                .item("sk", s("W"))
                .item("at", n(change.created))
                .item("ttl", n(change.created.saturating_add(EVENT_IDS_KEPT_SECS)))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(backend)
        };
        if let Some(subs) = &change.subscriptions {
            // Ordered by its subscription (the caller's): applied over the subscriptions and the
            // last event read, else Changed (read again).
            if subs.read != record.subscriptions || subs.plan != record.plan {
                return Ok(PlanChangeOutcome::Changed);
            }
            let last = record.last_event_at.map_or(change.created, |l| l.max(change.created));
            let mut condition = String::from("attribute_exists(pk) AND customer = :c AND #plan = :was_plan");
            condition.push_str(match &record.subscriptions {
                Some(_) => " AND subscriptions = :read",
                None => " AND attribute_not_exists(subscriptions)",
            });
            condition.push_str(match record.last_event_at {
                Some(_) => " AND last_event_at = :was",
                None => " AND attribute_not_exists(last_event_at)",
            });
            let mut update = Update::builder()
                .table_name(&self.table)
                .key("pk", s(tenant_pk(&record.id)))
                .key("sk", s("T"))
                .condition_expression(condition)
                .update_expression("SET #plan = :p, last_event_at = :at, subscriptions = :w")
                .expression_attribute_names("#plan", "plan")
                .expression_attribute_values(":c", s(change.customer.as_str()))
                .expression_attribute_values(":p", s(change.plan.as_str()))
                .expression_attribute_values(":at", n(last))
                .expression_attribute_values(":w", s(subs.written.as_str()))
                .expression_attribute_values(":was_plan", s(subs.plan.as_str()));
            if let Some(read) = &record.subscriptions {
                update = update.expression_attribute_values(":read", s(read.as_str()));
            }
            if let Some(was) = record.last_event_at {
                update = update.expression_attribute_values(":was", n(was));
            }
            let actions = vec![
                TransactWriteItem::builder().put(marker()?).build(),
                TransactWriteItem::builder().update(update.build().map_err(backend)?).build(),
            ];
            return match self
                .transact(actions, "a plan change conflicted with other writes under every attempt")
                .await?
            {
                None => {
                    record.plan = change.plan.clone();
                    record.last_event_at = Some(last);
                    record.subscriptions = Some(subs.written.clone());
                    Ok(PlanChangeOutcome::Applied(record))
                }
                // The event id was seen (the marker's condition), or the tenant moved on.
                Some(r) if r.first().is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) => {
                    Ok(PlanChangeOutcome::Duplicate)
                }
                Some(_) => Ok(PlanChangeOutcome::Changed),
            };
        }
        let update = Update::builder()
            .table_name(&self.table)
            .key("pk", s(tenant_pk(&record.id)))
            .key("sk", s("T"))
            .condition_expression(
                "attribute_exists(pk) AND customer = :c AND (attribute_not_exists(last_event_at) OR last_event_at <= :at)",
            )
            .update_expression("SET #plan = :p, last_event_at = :at")
            .expression_attribute_names("#plan", "plan")
            .expression_attribute_values(":c", s(change.customer.as_str()))
            .expression_attribute_values(":p", s(change.plan.as_str()))
            .expression_attribute_values(":at", n(change.created))
            .build()
            .map_err(backend)?;
        let actions = vec![
            TransactWriteItem::builder().put(marker()?).build(),
            TransactWriteItem::builder().update(update).build(),
        ];
        let (actions, marker, record) = (&actions, &marker, &record);
        self.until_won(
            "a plan change conflicted with other writes under every attempt",
            Retries::BACKING_OFF,
            (),
            |(), _| {
                Box::pin(async move {
                    let e =
                        match self.client.transact_write_items().set_transact_items(Some(actions.clone())).send().await
                        {
                            Ok(_) => {
                                let mut record = record.clone();
                                record.plan = change.plan.clone();
                                record.last_event_at = Some(change.created);
                                return Ok(Race::Won(PlanChangeOutcome::Applied(record)));
                            }
                            Err(e) => e,
                        };
                    match cancellation(&e) {
                        Some(r) if r.first().is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) => {
                            Ok(Race::Won(PlanChangeOutcome::Duplicate))
                        }
                        Some(r) if r.get(1).is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) => {
                            // Either a newer event was applied, or the customer left this tenant
                            // since it was looked up: read it again to tell.
                            let now = self.tenant(&record.id).await?;
                            let still =
                                now.as_ref().is_some_and(|t| t.customer.as_deref() == Some(change.customer.as_str()));
                            if !still {
                                return Ok(Race::Won(Box::pin(self.apply_plan_change(change)).await?));
                            }
                            if now.and_then(|t| t.last_event_at).is_none_or(|last| last <= change.created) {
                                return Ok(Race::Lost(()));
                            }
                            // Older than the last event applied: its id is marked, nothing else changes.
                            let marked = self
                                .client
                                .put_item()
                                .table_name(&self.table)
                                .set_item(Some(marker()?.item))
                                .condition_expression("attribute_not_exists(pk)")
                                .send()
                                .await;
                            match marked {
                                Ok(_) => Ok(Race::Won(PlanChangeOutcome::Stale)),
                                Err(e) if is_ccf(&e) => Ok(Race::Won(PlanChangeOutcome::Duplicate)),
                                Err(e) => Err(sdk(e)),
                            }
                        }
                        Some(_) => Ok(Race::Lost(())),
                        None => Err(sdk(e)),
                    }
                })
            },
        )
        .await
    }

    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        let Some(link) = self.get(key_pk(key), "K").await? else { return Ok(None) };
        if get_i(&link, "expires_at").is_some_and(|at| at <= unix_now()) {
            return Ok(None);
        }
        match get_s(&link, "tenant") {
            Some(tenant) => self.tenant(&tenant.into()).await,
            None => Ok(None),
        }
    }

    async fn put_key(&self, key: &ApiKeyRecord, when: KeyWrite) -> Result<(), StoreError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(key_pk(&key.hash)))
            .item("sk", s("K"))
            .item("tenant", s(key.tenant.as_str()))
            .item("kid", s(key.id.as_str()))
            .item("prefix", s(key.prefix.as_str()))
            .item("created_at", n(key.created_at))
            .item("gpk", s(keys_gpk(&key.tenant)))
            .item("gsk", s(key.id.as_str()))
            .condition_expression(match when {
                KeyWrite::Upsert => "attribute_not_exists(pk) OR tenant = :t",
                KeyWrite::Existing => "attribute_exists(pk) AND tenant = :t",
            })
            .expression_attribute_values(":t", s(key.tenant.as_str()));
        if let Some(at) = key.expires_at {
            put = put.item("expires_at", n(at));
        }
        // Absent (a key of an earlier build, or one `put_tenant` added): the default scopes.
        put = put.item("scopes", n(i64::from(key.scopes.bits())));
        match put.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_ccf(&e) && when == KeyWrite::Existing => {
                Err(StoreError::Conflict("the API key, removed meanwhile or held by another tenant"))
            }
            Err(e) if is_ccf(&e) => Err(StoreError::Conflict("the API key, held by another tenant")),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let items = self.index_items("gsi1", ("gpk", &keys_gpk(tenant)), ("gsk", None), usize::MAX, |q| q).await?;
        let mut keys: Vec<ApiKeyRecord> = items.iter().filter_map(key_record).filter(|k| &k.tenant == tenant).collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    async fn key(&self, key: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        // The table's own item, read consistently (the keys' index may lag).
        Ok(self.get(key_pk(key), "K").await?.as_ref().and_then(key_record))
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        Ok(self.get(tenant_pk(id), "T").await?.as_ref().and_then(tenant_record))
    }

    async fn update_tenant(&self, update: &TenantUpdate, when: UpdateWhen<'_>) -> Result<bool, StoreError> {
        let tenant = update.tenant();
        match (update, when) {
            // The customer index follows the tenant's customer: the customer it had must be
            // known, so the write is made over the tenant as read, tried again while another
            // write changes it.
            (TenantUpdate::Customer(..), UpdateWhen::Always) => {
                let retries = Retries::AT_ONCE.attempts(8);
                self.until_won("the tenant's customer", retries, (), |(), _| {
                    Box::pin(async move {
                        let Some(stored) = self.tenant(tenant).await? else { return Ok(Race::Won(false)) };
                        Ok(match self.write_tenant(update, Some(&stored)).await? {
                            true => Race::Won(true),
                            false => Race::Lost(()),
                        })
                    })
                })
                .await
            }
            (_, UpdateWhen::Always) => self.write_tenant(update, None).await,
            (_, UpdateWhen::Unchanged(read)) if read.id != *tenant => Ok(false),
            (_, UpdateWhen::Unchanged(read)) => self.write_tenant(update, Some(read)).await,
        }
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        let old = self.tenant(&record.id).await?;
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(tenant_pk(&record.id)))
            .item("sk", s("T"))
            .item("id", s(record.id.as_str()))
            .item("plan", s(record.plan.as_str()))
            .item("gpk", s("TENANT"))
            .item("gsk", s(record.id.as_str()));
        if let Some(c) = &record.customer {
            put = put.item("customer", s(c.as_str()));
        }
        if let Some(at) = record.last_event_at {
            put = put.item("last_event_at", n(at));
        }
        if let Some(subs) = &record.subscriptions {
            put = put.item("subscriptions", s(subs.as_str()));
        }
        if let Some(m) = &record.metronome_customer {
            put = put.item("metronome_customer", s(m.as_str()));
        }
        if let Some(o) = &record.overrides {
            put = put.item("overrides", s(o.as_str()));
        }
        if let Some(a) = &record.alert_endpoint {
            put = put.item("alert_endpoint", s(a.as_str()));
        }
        put.send().await.map_err(sdk)?;
        let old = old.and_then(|o| o.customer);
        self.move_customer(&record.id, old.as_deref(), record.customer.as_deref()).await?;
        for key in keys {
            // A key new to the table gets its id and creation time; one held keeps its
            // prefix, expiry and scopes; one moved from another tenant has the default scopes
            // (another tenant's grants are not this one's).
            let update = |moved: bool| {
                let set =
                    "SET tenant = :t, gpk = :g, gsk = :id, kid = :id, created_at = if_not_exists(created_at, :now), \
                           prefix = if_not_exists(prefix, :empty)";
                let u = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(key_pk(key)))
                    .key("sk", s("K"))
                    .update_expression(if moved { format!("{set} REMOVE scopes") } else { set.to_owned() })
                    .expression_attribute_values(":t", s(record.id.as_str()))
                    .expression_attribute_values(":g", s(keys_gpk(&record.id)))
                    .expression_attribute_values(":id", s(key.id()))
                    .expression_attribute_values(":now", n(unix_now()))
                    .expression_attribute_values(":empty", s(""));
                if moved {
                    u
                } else {
                    u.condition_expression("attribute_not_exists(pk) OR tenant = :t")
                }
            };
            match update(false).send().await {
                Ok(_) => {}
                Err(e) if is_ccf(&e) => {
                    update(true).send().await.map_err(sdk)?;
                }
                Err(e) => return Err(sdk(e)),
            }
        }
        Ok(())
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(key_pk(key)))
            .key("sk", s("K"))
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }
}

impl DynamoStore {
    /// One conditional write of `update`: only if the tenant exists and, with `read`, is
    /// still as read in everything the directory keeps of it. A customer write then moves the
    /// customer index to follow (`read` is required for it: the customer it had).
    async fn write_tenant(&self, update: &TenantUpdate, read: Option<&TenantRecord>) -> Result<bool, StoreError> {
        let mut write = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(tenant_pk(update.tenant())))
            .key("sk", s("T"));
        let mut condition = String::from("attribute_exists(pk)");
        if let Some(read) = read {
            let texts = [
                ("plan", Some(read.plan.as_str())),
                ("customer", read.customer.as_deref()),
                ("metronome_customer", read.metronome_customer.as_deref()),
                ("overrides", read.overrides.as_deref()),
                ("subscriptions", read.subscriptions.as_deref()),
                ("alert_endpoint", read.alert_endpoint.as_deref()),
            ];
            for (name, value) in texts {
                write = write.expression_attribute_names(format!("#r_{name}"), name);
                match value {
                    Some(v) => {
                        condition.push_str(&format!(" AND #r_{name} = :r_{name}"));
                        write = write.expression_attribute_values(format!(":r_{name}"), s(v));
                    }
                    None => condition.push_str(&format!(" AND attribute_not_exists(#r_{name})")),
                }
            }
            write = write.expression_attribute_names("#r_last_event_at", "last_event_at");
            match read.last_event_at {
                Some(at) => {
                    condition.push_str(" AND #r_last_event_at = :r_last_event_at");
                    write = write.expression_attribute_values(":r_last_event_at", n(at));
                }
                None => condition.push_str(" AND attribute_not_exists(#r_last_event_at)"),
            }
        }
        let (name, value) = match update {
            TenantUpdate::Plan(_, plan) => ("plan", Some(plan.as_str())),
            TenantUpdate::Customer(_, c) => ("customer", c.as_deref()),
            TenantUpdate::MetronomeCustomer(_, m) => ("metronome_customer", m.as_deref()),
            TenantUpdate::Overrides(_, o) => ("overrides", o.as_deref()),
            TenantUpdate::AlertEndpoint(_, a) => ("alert_endpoint", a.as_deref()),
        };
        // Another customer's subscriptions are not this one's.
        let forget = match (update, read) {
            (TenantUpdate::Customer(_, c), Some(read)) => read.customer != *c,
            (TenantUpdate::Customer(..), None) => {
                return Err(StoreError::Backend("a customer is written over a read of its tenant".into()))
            }
            _ => false,
        };
        write = write.expression_attribute_names("#u", name);
        let expression = match (value, forget) {
            (Some(v), forget) => {
                write = write.expression_attribute_values(":u", s(v));
                if forget {
                    "SET #u = :u REMOVE subscriptions"
                } else {
                    "SET #u = :u"
                }
            }
            (None, true) => "REMOVE #u, subscriptions",
            (None, false) => "REMOVE #u",
        };
        match write.condition_expression(condition).update_expression(expression).send().await {
            Ok(_) => {}
            Err(e) if is_ccf(&e) => return Ok(false),
            Err(e) => return Err(sdk(e)),
        }
        if let (TenantUpdate::Customer(tenant, customer), Some(read)) = (update, read) {
            self.move_customer(tenant, read.customer.as_deref(), customer.as_deref()).await?;
        }
        Ok(true)
    }

    /// The customer index after `tenant`'s customer went from `old` to `new` (its item written
    /// already): a customer given to it leaves any other tenant, and its old one's index entry
    /// goes (unless another tenant has it since).
    async fn move_customer(&self, tenant: &TenantId, old: Option<&str>, new: Option<&str>) -> Result<(), StoreError> {
        if let Some(c) = new {
            // A billing customer belongs to one tenant: given to this one, it leaves any other.
            if let Some(other) = self.tenant_by_customer(c).await?.filter(|t| &t.id != tenant) {
                let removed = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(tenant_pk(&other.id)))
                    .key("sk", s("T"))
                    .condition_expression("customer = :c")
                    .update_expression("REMOVE customer")
                    .expression_attribute_values(":c", s(c))
                    .send()
                    .await;
                if let Err(e) = removed {
                    if !is_ccf(&e) {
                        return Err(sdk(e));
                    }
                }
            }
            self.client
                .put_item()
                .table_name(&self.table)
                .item("pk", s(customer_pk(c)))
                .item("sk", s("C"))
                .item("tenant", s(tenant.as_str()))
                .send()
                .await
                .map_err(sdk)?;
        }
        if let Some(old) = old.filter(|o| new != Some(*o)) {
            // The tenant's old customer leaves it (unless another tenant has it since).
            let _ = self
                .client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(customer_pk(old)))
                .key("sk", s("C"))
                .condition_expression("tenant = :t")
                .expression_attribute_values(":t", s(tenant.as_str()))
                .send()
                .await;
        }
        Ok(())
    }
}

/// An API key's item.
fn key_record(item: &Item) -> Option<ApiKeyRecord> {
    let hash = KeyHash::from_hex(get_s(item, "pk")?.strip_prefix("K\u{1}")?)?;
    let created = get_i(item, "created_at").unwrap_or(0);
    Some(
        ApiKeyRecord::new(hash, get_s(item, "tenant")?.into(), created)
            .with_prefix(get_s(item, "prefix").unwrap_or(""))
            .with_expiry(get_i(item, "expires_at"))
            .with_scopes(get_i(item, "scopes").map_or(KeyScopes::DEFAULT, KeyScopes::from_bits)),
    )
}
