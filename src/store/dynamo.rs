//! The store of a fleet: one DynamoDB table that every node shares, through aws-sdk-dynamodb.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use aws_sdk_dynamodb::{
    error::SdkError,
    operation::{
        put_item::PutItemError,
        query::builders::QueryFluentBuilder,
        transact_write_items::TransactWriteItemsError,
        update_item::{builders::UpdateItemFluentBuilder, UpdateItemError},
    },
    types::{
        AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
        ProjectionType, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
        TimeToLiveSpecification, TransactWriteItem, Update,
    },
    Client,
};

use super::{
    unix_now, ApiKeyRecord, CommitOutcome, DeadLetter, EventOutcome, ExportClaim, ExportKey, ExportSend, Grant,
    IdempotencyClaim, IdempotencySettle, IdempotencyState, PlanChange, PlanChangeOutcome, QuotaKey, Reservation,
    ReserveToken, Store, StoreError, StoreInspect, TenantRecord, UsageAggregate, UsageBatch, UsageEvent,
};
use crate::{config::TenantId, tenant::KeyHash};

type Item = HashMap<String, AttributeValue>;

/// Separates the parts of a key: below every character a tenant id or a meter name may hold, so
/// that keys sort as their (tenant, meter, window) tuples do.
const SEP: char = '\u{1}';
/// A transaction holds at most 100 actions: a flush's records and its flush id.
const MAX_BATCH_RECORDS: usize = 99;
/// The senders whose last quota call a counter remembers (as the other stores).
const SENDERS_KEPT: usize = 64;
/// How long items kept only to make retries no-ops live (their `ttl` attribute): flush ids a
/// week, usage and webhook event ids 35 days after their time; aggregates and quota counters
/// 35 days after their window or period.
const FLUSH_IDS_KEPT_SECS: i64 = 7 * 86_400;
const KEPT_SECS: i64 = 35 * 86_400;
/// A sender whose last call is younger than this is never forgotten: its retry may still come.
const SENDER_QUIET_SECS: i64 = 600;
/// How many times a call that lost a race (a transaction conflict, a counter created under
/// it) is tried again, with backoff and jitter.
const ATTEMPTS: u32 = 12;

/// The DynamoDB store: quota counters, usage aggregates and their export state, flush ids,
/// the tenant directory and seen event ids in one table shared by every node of a fleet.
///
/// The table (`create_table`) has a string partition key `pk` and sort key `sk`, two global
/// secondary indexes (`gsi1`: aggregates waiting for export and the tenant list; `gsi2`: dead
/// letters) and a `ttl` attribute. `docs/dynamodb.md` describes every item.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn get_i(item: &Item, name: &str) -> Option<i64> {
    item.get(name).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok())
}

fn get_u(item: &Item, name: &str) -> u64 {
    get_i(item, name).and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn sdk<E, R>(e: SdkError<E, R>) -> StoreError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match e {
        SdkError::TimeoutError(_) => StoreError::Timeout(Duration::ZERO),
        e => StoreError::Backend(Box::new(StoreMessage(aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string()))),
    }
}

/// A store error's text (the SDK's errors with their whole context).
#[derive(Debug)]
struct StoreMessage(String);

impl std::fmt::Display for StoreMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreMessage {}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn is_ccf<E, R>(e: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    e.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

/// A window start as text that sorts as the number does (negative ones included).
fn window_text(w: i64) -> String {
    format!("{:016x}", (w as u64) ^ (1 << 63))
}

fn hex_node(v: u64) -> String {
    format!("{v:016x}")
}

/// Sleeps before attempt `attempt` of a call that lost a race: exponential, with jitter.
async fn backoff(attempt: u32) {
    let base = 10u64 << attempt.min(7);
    // From the OS, not RandomState: copies of one SnapStart snapshot back off apart.
    let jitter = crate::tenant::draw_u64() % base;
    tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
}

impl DynamoStore {
    /// A store on `table` through `client`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    /// A store on `table` with the standard AWS configuration (region, credentials chain,
    /// `AWS_ENDPOINT_URL_DYNAMODB`), or `endpoint` when given (a local server).
    pub async fn from_env(table: impl Into<String>, endpoint: Option<&str>) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        Self::new(Client::new(&config), table)
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Checks that the table exists and is active.
    ///
    /// # Errors
    /// [`StoreError::Unusable`] naming the table when it does not exist.
    pub async fn check_table(&self) -> Result<(), StoreError> {
        match self.client.describe_table().table_name(&self.table).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                Err(StoreError::Unusable(format!(
                    "DynamoDB table {} does not exist: create it (`tollgate dynamodb create-table`, \
                     or docs/dynamodb.md)",
                    self.table
                )))
            }
            Err(e) => Err(sdk(e)),
        }
    }

    /// Creates the table (on-demand capacity, both indexes, TTL on `ttl`) and waits until it
    /// is active.
    ///
    /// # Errors
    /// The service's error (a table of that name exists, no permission).
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(backend)
        };
        let key =
            |name: &str, kind| KeySchemaElement::builder().attribute_name(name).key_type(kind).build().map_err(backend);
        let index = |name: &str, hash: &str, range: &str| -> Result<GlobalSecondaryIndex, StoreError> {
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .key_schema(key(hash, KeyType::Hash)?)
                .key_schema(key(range, KeyType::Range)?)
                .projection(Projection::builder().projection_type(ProjectionType::All).build())
                .build()
                .map_err(backend)
        };
        self.client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_attribute_definitions(Some(vec![
                attr("pk")?,
                attr("sk")?,
                attr("gpk")?,
                attr("gsk")?,
                attr("dpk")?,
                attr("dsk")?,
            ]))
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .global_secondary_indexes(index("gsi1", "gpk", "gsk")?)
            .global_secondary_indexes(index("gsi2", "dpk", "dsk")?)
            .send()
            .await
            .map_err(sdk)?;
        // Real DynamoDB creates the table in the background.
        for _ in 0..120 {
            let t = self.client.describe_table().table_name(&self.table).send().await.map_err(sdk)?;
            let active = t.table().and_then(|t| t.table_status()).map(|s| s.as_str() == "ACTIVE");
            if active.unwrap_or(false) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let ttl = TimeToLiveSpecification::builder().attribute_name("ttl").enabled(true).build().map_err(backend)?;
        self.client
            .update_time_to_live()
            .table_name(&self.table)
            .time_to_live_specification(ttl)
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    /// The items of a secondary index under one partition key, in sort-key order after
    /// `range.1`, at most `want` of them, paging as needed; `shape` adds a filter.
    async fn index_items(
        &self,
        index: &str,
        hash: (&str, &str),
        range: (&str, Option<String>),
        want: usize,
        shape: impl Fn(QueryFluentBuilder) -> QueryFluentBuilder,
    ) -> Result<Vec<Item>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        while out.len() < want {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(index)
                .expression_attribute_names("#h", hash.0)
                .expression_attribute_values(":h", s(hash.1))
                .limit(i32::try_from(want - out.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take());
            q = match &range.1 {
                Some(after) => q
                    .key_condition_expression("#h = :h AND #r > :after")
                    .expression_attribute_names("#r", range.0)
                    .expression_attribute_values(":after", s(after.as_str())),
                None => q.key_condition_expression("#h = :h"),
            };
            let page = shape(q).send().await.map_err(sdk)?;
            let room = want - out.len();
            out.extend(page.items.unwrap_or_default().into_iter().take(room));
            match page.last_evaluated_key {
                Some(k) if out.len() < want => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }

    /// An update of the usage aggregate `key`.
    fn update_aggregate(&self, key: &ExportKey) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(usage_pk(&key.tenant)))
            .key("sk", s(usage_sk(key.meter.as_str(), key.window_start)))
    }

    /// An update of the aggregate that `claim` may take (or, `in_flight`, hold): `exists` holds,
    /// the revision read has not moved, it is not dead-lettered, no other node holds an
    /// unexpired claim; the claim's values are bound (`:node`, `:now`, `:until`).
    fn claim_aggregate(
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

    async fn get(&self, pk: String, sk: &str) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk)?;
        Ok(out.item)
    }

    async fn customer_of(&self, tenant: &TenantId) -> Result<Option<String>, StoreError> {
        Ok(self.get(tenant_pk(tenant), "T").await?.and_then(|t| get_s(&t, "customer").map(str::to_owned)))
    }

    /// The counter of `key` exists (created now if its period is still of use, dropping the
    /// periods of the same tenant and meter that ended before it started); `false` for a
    /// period already dropped.
    async fn ensure_counter(&self, key: &QuotaKey) -> Result<bool, StoreError> {
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
                .item("ttl", n(floor.saturating_add(KEPT_SECS)))
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
            .item("ttl", n(key.end.saturating_add(KEPT_SECS)))
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
    async fn add(
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
    async fn after_add(&self, key: &QuotaKey, token: ReserveToken, reserved: u64, item: &Item) {
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
    fn seen(item: &Item, token: ReserveToken) -> Option<Grant> {
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

fn quota_pk(key: &QuotaKey) -> String {
    format!("Q{SEP}{}{SEP}{}", key.tenant, key.meter)
}

fn quota_sk(key: &QuotaKey) -> String {
    format!("{}{SEP}{}{SEP}{}", key.period_tag(), window_text(key.start), window_text(key.end))
}

fn tenant_pk(tenant: &TenantId) -> String {
    format!("T{SEP}{tenant}")
}

fn usage_pk(tenant: &TenantId) -> String {
    format!("U{SEP}{tenant}")
}

fn usage_sk(meter: &str, window_start: i64) -> String {
    format!("{meter}{SEP}{}", window_text(window_start))
}

/// The sort key of an aggregate in the indexes: (tenant, meter, window) order.
fn usage_gsk(key: &ExportKey) -> String {
    format!("{}{SEP}{}{SEP}{}", key.tenant, key.meter, window_text(key.window_start))
}

fn key_pk(key: &KeyHash) -> String {
    format!("K{SEP}{}", key.to_hex())
}

fn keys_gpk(tenant: &TenantId) -> String {
    format!("KEYS{SEP}{tenant}")
}

fn idempotency_pk(key: &str) -> String {
    format!("I{SEP}{key}")
}

fn customer_pk(customer: &str) -> String {
    format!("C{SEP}{customer}")
}

fn aggregate(item: &Item, customer: Option<String>) -> Option<UsageAggregate> {
    let tenant: TenantId = get_s(item, "tenant")?.into();
    let key = ExportKey::new(tenant, get_s(item, "meter")?.into(), get_i(item, "window")?);
    let mut a = UsageAggregate::new(key, get_u(item, "quantity"));
    a.exported = get_u(item, "exported");
    a.revision = u32::try_from(get_u(item, "revision")).unwrap_or(u32::MAX);
    a.in_flight = item.contains_key("in_flight").then(|| get_u(item, "in_flight"));
    a.customer = customer;
    a.attempts = u32::try_from(get_u(item, "attempts")).unwrap_or(u32::MAX);
    a.unknown_failures = u32::try_from(get_u(item, "unknown_failures")).unwrap_or(u32::MAX);
    a.first_attempt_at = get_i(item, "first_attempt_at");
    a.claimed_until = get_i(item, "claim_until");
    a.send = get_s(item, "send").and_then(ExportSend::from_json);
    Some(a)
}

fn tenant_record(item: &Item) -> Option<TenantRecord> {
    let mut t = TenantRecord::new(get_s(item, "id")?.into(), get_s(item, "plan")?.into());
    t.customer = get_s(item, "customer").map(str::to_owned);
    t.last_event_at = get_i(item, "last_event_at");
    t.overrides = get_s(item, "overrides").map(str::to_owned);
    Some(t)
}

/// The update that adds a record's quantity to its aggregate (created if need be) and puts
/// it in line for export.
fn usage_update(table: &str, tenant: &TenantId, meter: &str, window: i64, quantity: u64) -> Result<Update, StoreError> {
    let key = ExportKey::new(tenant.clone(), meter.into(), window);
    Update::builder()
        .table_name(table)
        .key("pk", s(usage_pk(tenant)))
        .key("sk", s(usage_sk(meter, window)))
        .update_expression("ADD quantity :q SET tenant = :t, meter = :m, #w = :w, gpk = :g, gsk = :k, #ttl = :ttl")
        .expression_attribute_names("#w", "window")
        .expression_attribute_names("#ttl", "ttl")
        .expression_attribute_values(":q", n(quantity))
        .expression_attribute_values(":t", s(tenant.as_str()))
        .expression_attribute_values(":m", s(meter))
        .expression_attribute_values(":w", n(window))
        .expression_attribute_values(":g", s("PENDING"))
        .expression_attribute_values(":k", s(usage_gsk(&key)))
        .expression_attribute_values(":ttl", n(window.saturating_add(KEPT_SECS)))
        .build()
        .map_err(backend)
}

/// Why a transaction was cancelled: one code per action (`None` for the actions that were
/// fine), or `None` for another error.
fn cancellation(e: &SdkError<TransactWriteItemsError, impl std::fmt::Debug>) -> Option<Vec<Option<String>>> {
    match e.as_service_error()? {
        TransactWriteItemsError::TransactionCanceledException(c) => Some(
            c.cancellation_reasons().iter().map(|r| r.code().filter(|c| *c != "None").map(str::to_owned)).collect(),
        ),
        _ => None,
    }
}

/// Whether a failed transaction may go through when sent again (a conflict with another
/// transaction, throttling), as opposed to a condition that failed.
fn retryable(reasons: &[Option<String>]) -> bool {
    reasons.iter().flatten().all(|c| {
        matches!(
            c.as_str(),
            "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded" | "RequestLimitExceeded"
        )
    })
}

#[async_trait]
impl Store for DynamoStore {
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
            let update = usage_update(&self.table, &r.tenant, r.meter.as_str(), r.window_start, r.quantity)?;
            actions.push(TransactWriteItem::builder().update(update).build());
        }
        for attempt in 0..ATTEMPTS {
            let sent = self.client.transact_write_items().set_transact_items(Some(actions.clone())).send().await;
            match sent {
                Ok(_) => return Ok(CommitOutcome::Applied),
                Err(e) => match cancellation(&e) {
                    Some(reasons)
                        if reasons.first().is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) =>
                    {
                        return Ok(CommitOutcome::AlreadyApplied)
                    }
                    Some(reasons) if retryable(&reasons) => backoff(attempt).await,
                    _ => return Err(sdk(e)),
                },
            }
        }
        Err(StoreError::Conflict("a usage flush conflicted with other writes under every attempt"))
    }

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
        let mut customers: HashMap<TenantId, Option<String>> = HashMap::new();
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            let Some(tenant) = get_s(item, "tenant").map(TenantId::from) else { continue };
            let customer = match customers.get(&tenant) {
                Some(c) => c.clone(),
                None => {
                    let c = self.customer_of(&tenant).await?;
                    customers.insert(tenant, c.clone());
                    c
                }
            };
            out.extend(aggregate(item, customer));
        }
        Ok(out)
    }

    async fn begin_export(
        &self,
        aggregate_: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        let key = &aggregate_.key;
        let out = self
            .claim_aggregate(aggregate_, claim, "attribute_exists(pk)")
            .update_expression(
                "SET claim_node = :node, claim_until = :until, attempts = if_not_exists(attempts, :zero) + :one, \
                 first_attempt_at = if_not_exists(first_attempt_at, :now), \
                 in_flight = if_not_exists(in_flight, :q), send = if_not_exists(send, :send)",
            )
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
                let customer = self.customer_of(&key.tenant).await?;
                Ok(aggregate(&item, customer))
            }
            Err(e) if is_ccf(&e) => Ok(None),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn defer_export(
        &self,
        aggregate_: &UsageAggregate,
        claim: &ExportClaim,
        unknown: bool,
    ) -> Result<bool, StoreError> {
        let out = self
            .claim_aggregate(aggregate_, claim, "attribute_exists(in_flight)")
            .update_expression(
                "SET claim_node = :node, claim_until = :until, \
                 unknown_failures = if_not_exists(unknown_failures, :zero) + :u",
            )
            .expression_attribute_values(":u", n(u32::from(unknown)))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if is_ccf(&e) => Ok(false),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn finish_export(&self, aggregate_: &UsageAggregate) -> Result<bool, StoreError> {
        let key = &aggregate_.key;
        let (pk, sk) = (usage_pk(&key.tenant), usage_sk(key.meter.as_str(), key.window_start));
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk.clone()))
            .key("sk", s(sk.clone()))
            .condition_expression(
                "attribute_exists(in_flight) AND (revision = :rev OR (attribute_not_exists(revision) AND :rev = :zero))",
            )
            .update_expression(
                "SET exported = in_flight, revision = if_not_exists(revision, :zero) + :one, attempts = :zero, \
                 unknown_failures = :zero \
                 REMOVE in_flight, send, first_attempt_at, claim_node, claim_until, dead, dpk, dsk",
            )
            .expression_attribute_values(":rev", n(aggregate_.revision))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .send()
            .await;
        match out {
            Ok(_) => {}
            Err(e) if is_ccf(&e) => return Ok(false),
            Err(e) => return Err(sdk(e)),
        }
        // Out of the export index once all is exported (a flush adding to it puts it back).
        let done = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .condition_expression("quantity = exported AND attribute_not_exists(in_flight)")
            .update_expression("REMOVE gpk, gsk")
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
            .update_expression("SET dead = :r, dpk = :d, dsk = :k")
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
                let a = aggregate(item, None)?;
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
                "REMOVE dead, dpk, dsk, in_flight, send, first_attempt_at, claim_node, claim_until \
                 SET gpk = :g, gsk = :k, attempts = :zero, unknown_failures = :zero, \
                 revision = if_not_exists(revision, :zero) + :one",
            )
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

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        let mut out = Vec::with_capacity(events.len());
        // A token per call and event: the SDK's own retries of a transaction whose answer was
        // lost are then answered as the first (applied), not as a duplicate; a later delivery
        // of the event, a new call, gets a new token and its condition fails (duplicate).
        let call = crate::tenant::draw_u64();
        'events: for (i, e) in events.iter().enumerate() {
            let token = format!("{call:016x}{:016x}", (i as u64) ^ 0x5bd1_e995);
            let seen = Put::builder()
                .table_name(&self.table)
                .item("pk", s(format!("E{SEP}{}", e.id)))
                .item("sk", s("E"))
                .item("ttl", n(e.at.saturating_add(KEPT_SECS)))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(backend)?;
            let r = &e.record;
            let update = usage_update(&self.table, &r.tenant, r.meter.as_str(), r.window_start, r.quantity)?;
            let actions = vec![
                TransactWriteItem::builder().put(seen).build(),
                TransactWriteItem::builder().update(update).build(),
            ];
            for attempt in 0..ATTEMPTS {
                let request = self
                    .client
                    .transact_write_items()
                    .set_transact_items(Some(actions.clone()))
                    .client_request_token(&token);
                match request.send().await {
                    Ok(_) => {
                        out.push(EventOutcome::Applied);
                        continue 'events;
                    }
                    // Another request with this token is still being applied: wait, send again.
                    Err(err)
                        if err.as_service_error().is_some_and(|e| {
                            matches!(e, TransactWriteItemsError::TransactionInProgressException(_))
                        }) =>
                    {
                        backoff(attempt).await
                    }
                    Err(err) => match cancellation(&err) {
                        Some(reasons)
                            if reasons.first().is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) =>
                        {
                            out.push(EventOutcome::Duplicate);
                            continue 'events;
                        }
                        Some(reasons) if !retryable(&reasons) => return Err(sdk(err)),
                        Some(_) => backoff(attempt).await,
                        None => return Err(sdk(err)),
                    },
                }
            }
            return Err(StoreError::Conflict("a usage event conflicted with other writes under every attempt"));
        }
        Ok(out)
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let customer = self.customer_of(tenant).await?;
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
            out.extend(page.items.unwrap_or_default().iter().filter_map(|i| aggregate(i, customer.clone())));
            match page.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
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
                .item("ttl", n(change.created.saturating_add(KEPT_SECS)))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(backend)
        };
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
        for attempt in 0..ATTEMPTS {
            match self.client.transact_write_items().set_transact_items(Some(actions.clone())).send().await {
                Ok(_) => {
                    record.plan = change.plan.clone();
                    record.last_event_at = Some(change.created);
                    return Ok(PlanChangeOutcome::Applied(record));
                }
                Err(e) => match cancellation(&e) {
                    Some(r) if r.first().is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) => {
                        return Ok(PlanChangeOutcome::Duplicate)
                    }
                    Some(r) if r.get(1).is_some_and(|c| c.as_deref() == Some("ConditionalCheckFailed")) => {
                        // Either a newer event was applied, or the customer left this tenant
                        // since it was looked up: read it again to tell.
                        let now = self.tenant(&record.id).await?;
                        let still =
                            now.as_ref().is_some_and(|t| t.customer.as_deref() == Some(change.customer.as_str()));
                        if !still {
                            return Box::pin(self.apply_plan_change(change)).await;
                        }
                        if now.and_then(|t| t.last_event_at).is_none_or(|last| last <= change.created) {
                            backoff(attempt).await;
                            continue;
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
                        return match marked {
                            Ok(_) => Ok(PlanChangeOutcome::Stale),
                            Err(e) if is_ccf(&e) => Ok(PlanChangeOutcome::Duplicate),
                            Err(e) => Err(sdk(e)),
                        };
                    }
                    Some(_) => backoff(attempt).await,
                    None => return Err(sdk(e)),
                },
            }
        }
        Err(StoreError::Conflict("a plan change conflicted with other writes under every attempt"))
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

    async fn put_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
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
            .condition_expression("attribute_not_exists(pk) OR tenant = :t")
            .expression_attribute_values(":t", s(key.tenant.as_str()));
        if let Some(at) = key.expires_at {
            put = put.item("expires_at", n(at));
        }
        match put.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_ccf(&e) => Err(StoreError::Conflict("the API key, held by another tenant")),
            Err(e) => Err(sdk(e)),
        }
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let items = self.index_items("gsi1", ("gpk", &keys_gpk(tenant)), ("gsk", None), usize::MAX, |q| q).await?;
        let mut keys: Vec<ApiKeyRecord> = items
            .iter()
            .filter_map(|item| {
                let hash = KeyHash::from_hex(get_s(item, "pk")?.strip_prefix("K\u{1}")?)?;
                let created = get_i(item, "created_at").unwrap_or(0);
                Some(
                    ApiKeyRecord::new(hash, tenant.clone(), created)
                        .with_prefix(get_s(item, "prefix").unwrap_or(""))
                        .with_expiry(get_i(item, "expires_at")),
                )
            })
            .collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(keys)
    }

    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let out = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(idempotency_pk(&c.key)))
            .item("sk", s("I"))
            .item("request", s(c.request.as_str()))
            .item("owner", s(hex_node(c.owner)))
            .item("completed", AttributeValue::Bool(false))
            .item("until", n(c.in_flight_until))
            .item("ttl", n(c.expires_at))
            // Free: never claimed, expired (TTL deletion is lazy), or left in flight too long.
            .condition_expression("attribute_not_exists(pk) OR #ttl <= :now OR (completed = :no AND #until <= :now)")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":now", n(c.now))
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match out {
            Ok(_) => Ok(IdempotencyState::Claimed),
            Err(e) => match e.into_service_error() {
                PutItemError::ConditionalCheckFailedException(held) => {
                    // The binding that holds the key: without it the answer cannot be told.
                    let Some(held) = held.item else {
                        return Err(StoreError::Conflict("an Idempotency-Key claim failed without the binding it met"));
                    };
                    let completed = held.get("completed").and_then(|v| v.as_bool().ok()).copied().unwrap_or(false);
                    Ok(if get_s(&held, "request") != Some(c.request.as_str()) {
                        IdempotencyState::Mismatch
                    } else if completed {
                        IdempotencyState::Completed
                    } else {
                        IdempotencyState::InFlight
                    })
                }
                e => Err(backend(e)),
            },
        }
    }

    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError> {
        let pk = idempotency_pk(key);
        let result = match how {
            IdempotencySettle::Completed => self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(pk))
                .key("sk", s("I"))
                .update_expression("SET completed = :yes")
                .condition_expression("#owner = :o AND completed = :no")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":o", s(hex_node(owner)))
                .expression_attribute_values(":yes", AttributeValue::Bool(true))
                .expression_attribute_values(":no", AttributeValue::Bool(false))
                .send()
                .await
                .map(drop)
                .map_err(|e| (is_ccf(&e), sdk(e))),
            _ => self
                .client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(pk))
                .key("sk", s("I"))
                .condition_expression("#owner = :o AND completed = :no")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":o", s(hex_node(owner)))
                .expression_attribute_values(":no", AttributeValue::Bool(false))
                .send()
                .await
                .map(drop)
                .map_err(|e| (is_ccf(&e), sdk(e))),
        };
        match result {
            // Not this owner's any more (expired and claimed again): nothing to do.
            Ok(()) | Err((true, _)) => Ok(()),
            Err((false, e)) => Err(e),
        }
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        Ok(self.get(tenant_pk(id), "T").await?.as_ref().and_then(tenant_record))
    }

    async fn set_overrides(&self, tenant: &TenantId, overrides: Option<&str>) -> Result<bool, StoreError> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(tenant_pk(tenant)))
            .key("sk", s("T"))
            .condition_expression("attribute_exists(pk)");
        let update = match overrides {
            Some(o) => update.update_expression("SET overrides = :o").expression_attribute_values(":o", s(o)),
            None => update.update_expression("REMOVE overrides"),
        };
        match update.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_ccf(&e) => Ok(false),
            Err(e) => Err(sdk(e)),
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
        if let Some(o) = &record.overrides {
            put = put.item("overrides", s(o.as_str()));
        }
        put.send().await.map_err(sdk)?;
        if let Some(c) = &record.customer {
            // A billing customer belongs to one tenant: given to this one, it leaves any other.
            if let Some(other) = self.tenant_by_customer(c).await?.filter(|t| t.id != record.id) {
                let removed = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(tenant_pk(&other.id)))
                    .key("sk", s("T"))
                    .condition_expression("customer = :c")
                    .update_expression("REMOVE customer")
                    .expression_attribute_values(":c", s(c.as_str()))
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
                .item("tenant", s(record.id.as_str()))
                .send()
                .await
                .map_err(sdk)?;
        }
        if let Some(old) = old.and_then(|o| o.customer).filter(|o| record.customer.as_ref() != Some(o)) {
            // The tenant's old customer leaves it (unless another tenant has it since).
            let _ = self
                .client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(customer_pk(&old)))
                .key("sk", s("C"))
                .condition_expression("tenant = :t")
                .expression_attribute_values(":t", s(record.id.as_str()))
                .send()
                .await;
        }
        for key in keys {
            // A key new to the table gets its id and creation time; one held keeps its
            // prefix and expiry.
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(key_pk(key)))
                .key("sk", s("K"))
                .update_expression(
                    "SET tenant = :t, gpk = :g, gsk = :id, kid = :id, created_at = if_not_exists(created_at, :now), \
                     prefix = if_not_exists(prefix, :empty)",
                )
                .expression_attribute_values(":t", s(record.id.as_str()))
                .expression_attribute_values(":g", s(keys_gpk(&record.id)))
                .expression_attribute_values(":id", s(key.id()))
                .expression_attribute_values(":now", n(unix_now()))
                .expression_attribute_values(":empty", s(""))
                .send()
                .await
                .map_err(sdk)?;
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

    fn max_batch_records(&self) -> usize {
        MAX_BATCH_RECORDS
    }
}

#[async_trait]
impl StoreInspect for DynamoStore {
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError> {
        Ok(self.get(quota_pk(key), &quota_sk(key)).await?.map_or(0, |i| get_u(&i, "reserved")))
    }

    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let Some(item) = self.get(usage_pk(&key.tenant), &usage_sk(key.meter.as_str(), key.window_start)).await? else {
            return Ok(None);
        };
        let customer = self.customer_of(&key.tenant).await?;
        Ok(aggregate(&item, customer))
    }
}
