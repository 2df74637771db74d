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

use super::contract::{
    EVENT_IDS_KEPT_SECS, FLUSH_IDS_KEPT_SECS, RETENTION_SECS, SENDERS_KEPT, SENDER_QUIET_SECS, USAGE_KEPT_SECS,
};
use super::{
    unix_now, ApiKeyRecord, CommitOutcome, DeadLetter, Deferral, DirectoryStore, EventOutcome, ExportClaim, ExportKey,
    ExportSend, ExportStore, Grant, IdempotencyClaim, IdempotencySettle, IdempotencyState, IdempotencyStore,
    LedgerEntry, LedgerStore, PlanChange, PlanChangeOutcome, QuotaKey, QuotaStore, Reservation, ReserveToken,
    StoreError, Tally, TallyQuery, TallyRead, TallyScope, TenantRecord, TenantUpdate, UpdateWhen, UsageAggregate,
    UsageBatch, UsageEvent, UsageRecord, UsageStore, LEDGER_KEPT_SECS,
};
use crate::base::{KeyHash, KeyScopes, TenantId};

mod audit;
mod counters;
mod credits;
mod directory;
mod export;
mod idempotency;
mod keys;
mod ledger;
mod outbox;
mod place;
mod quota;
mod race;
mod rate;
mod reads;
mod recharge;
mod schema;
mod usage;
mod values;
pub use reads::DynamoReads;

use keys::{
    credit_pk, credit_sk, customer_pk, grant_id_pk, idempotency_pk, kept_refund_pk, kept_refunds_count_pk, key_pk,
    keys_gpk, payment_pk, payments_pk, places_pk, quota_pk, quota_sk, rate_pk, tally_pk, tenant_pk, usage_gsk,
    usage_pk, usage_sk, values_pk, values_sk, window_text, CHANGES_PK, CREDIT_DUE_GPK, META_PK, NAMESPACE_SK, ONE_SK,
    SEP,
};

type Item = HashMap<String, AttributeValue>;

/// A transaction holds at most 100 actions: a flush's records and its flush id.
const MAX_BATCH_RECORDS: usize = 99;

/// The most items of one `TransactWriteItems` (DynamoDB's limit).
const TRANSACT_ITEMS_MAX: usize = 100;

/// The DynamoDB store: quota counters, usage aggregates and their export state, flush ids,
/// the tenant directory and seen event ids in one table shared by every node of a fleet.
///
/// The table (`create_table`) has a string partition key `pk` and sort key `sk`, two global
/// secondary indexes (`gsi1`: aggregates waiting for export and the tenant list; `gsi2`: dead
/// letters) and a `ttl` attribute. The [DynamoDB guide](crate::guide::dynamodb) describes every item.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    /// What its usage reads cost ([`DynamoStore::usage_reads`]).
    reads: std::sync::Arc<reads::ReadCounts>,
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

/// Whether a write was refused because its item is inside a transaction under way.
fn is_conflict<E, R>(e: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    e.as_service_error().and_then(|e| e.code()) == Some("TransactionConflictException")
}

fn is_ccf<E, R>(e: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    e.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

fn hex_node(v: u64) -> String {
    format!("{v:016x}")
}

impl DynamoStore {
    /// A store on `table` through `client`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into(), reads: std::sync::Arc::default() }
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
    #[must_use]
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The client.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
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
}

fn aggregate(item: &Item) -> Option<UsageAggregate> {
    let tenant: TenantId = get_s(item, "tenant")?.into();
    let key = ExportKey::new(tenant, get_s(item, "meter")?.into(), get_i(item, "window")?);
    let mut a = UsageAggregate::new(key, get_u(item, "quantity"));
    a.exported = get_u(item, "exported");
    a.revision = u32::try_from(get_u(item, "revision")).unwrap_or(u32::MAX);
    a.in_flight = item.contains_key("in_flight").then(|| get_u(item, "in_flight"));
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
    t.alert_endpoint = get_s(item, "alert_endpoint").map(str::to_owned);
    t.subscriptions = get_s(item, "subscriptions").map(str::to_owned);
    t.metronome_customer = get_s(item, "metronome_customer").map(str::to_owned);
    Some(t)
}

/// The update that adds a record's quantity to its aggregate (created if need be) and puts
/// it in line for export.
fn usage_update(table: &str, r: &UsageRecord) -> Result<Update, StoreError> {
    let key = ExportKey::new(r.tenant.clone(), r.meter.clone(), r.window_start);
    // An aggregate is an export candidate (in the export index) once billable usage was added.
    let expression = if r.billable {
        // Waiting for export: kept 63 days (a dead letter keeps its own, `dead_ttl`).
        "ADD quantity :q SET tenant = :t, meter = :m, #w = :w, gpk = :g, gsk = :k, \
         #ttl = if_not_exists(dead_ttl, :ttl)"
    } else {
        // Not billable: the first commit's TTL (63 days; 35 before 63 were kept) or whatever it
        // has since.
        "ADD quantity :q SET tenant = :t, meter = :m, #w = :w, #ttl = if_not_exists(#ttl, :ttl)"
    };
    let update = Update::builder()
        .table_name(table)
        .key("pk", s(usage_pk(&r.tenant)))
        .key("sk", s(usage_sk(r.meter.as_str(), r.window_start)))
        .update_expression(expression)
        .expression_attribute_names("#w", "window")
        .expression_attribute_names("#ttl", "ttl")
        .expression_attribute_values(":q", n(r.quantity))
        .expression_attribute_values(":t", s(r.tenant.as_str()))
        .expression_attribute_values(":m", s(r.meter.as_str()))
        .expression_attribute_values(":w", n(r.window_start))
        .expression_attribute_values(
            ":ttl",
            n(if r.billable { waiting_ttl(r.window_start) } else { exported_ttl(r.window_start) }),
        );
    let update = if r.billable {
        update.expression_attribute_values(":g", s("PENDING")).expression_attribute_values(":k", s(usage_gsk(&key)))
    } else {
        update
    };
    update.build().map_err(backend)
}

/// How long an aggregate not yet exported outlives Stripe's 35 days at least: an exporter that
/// was down this long still finds it, and parks it as a dead letter (kept) rather than lose it.
const WAITING_GRACE_SECS: i64 = 14 * 86_400;

/// The TTL of an aggregate waiting for export (or never to be exported): 63 days after its
/// window (`USAGE_KEPT_SECS`, past Stripe's 35 days and the grace).
fn waiting_ttl(window_start: i64) -> i64 {
    window_start.saturating_add(USAGE_KEPT_SECS.max(RETENTION_SECS + WAITING_GRACE_SECS))
}

/// The TTL of an exported aggregate: 63 days after its window (`USAGE_KEPT_SECS`: read for
/// the previous billing period).
fn exported_ttl(window_start: i64) -> i64 {
    window_start.saturating_add(USAGE_KEPT_SECS)
}

/// The TTL of a dead letter: past any horizon (DynamoDB ignores a TTL so far ahead), so that it
/// is kept until requeued or confirmed. Kept also in `dead_ttl`, which only dead letters carry,
/// so that late usage committed to one keeps it.
fn dead_letter_ttl(window_start: i64) -> i64 {
    window_start.saturating_add(100 * 365 * 86_400)
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

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::QuotaInspect for DynamoStore {
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError> {
        Ok(self.get(quota_pk(key), &quota_sk(key)).await?.map_or(0, |i| get_u(&i, "reserved")))
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait]
impl crate::store::UsageInspect for DynamoStore {
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let Some(item) = self.get(usage_pk(&key.tenant), &usage_sk(key.meter.as_str(), key.window_start)).await? else {
            return Ok(None);
        };
        Ok(aggregate(&item))
    }
}
