//! The table layout of the DynamoStore: one table, its keys and its index, created by
//! `tollgate dynamodb create-table` or checked at open.

use super::*;

impl DynamoStore {
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
        // A new table draws its meter event identifier namespace; a table made before
        // namespaces has none, and keeps its identifiers until asked to change.
        self.init_identifier_namespace().await?;
        Ok(())
    }

    /// Draws the table's meter event identifier namespace if it has none (one conditional
    /// write): for a table made otherwise than by [`create_table`](Self::create_table)
    /// (CloudFormation, Terraform), before its first export. Returns whether it drew one, and
    /// the namespace the table has. On a table that exported under the empty namespace, exports
    /// in flight keep the identifiers they began with; revisions begun after use the new
    /// namespace, so every node must run a version that keeps identifiers with the export
    /// (`tollgate dynamodb init-namespace`).
    ///
    /// # Errors
    /// The service's error.
    pub async fn init_identifier_namespace(&self) -> Result<(bool, String), StoreError> {
        use crate::store::ExportStore;
        let drawn = crate::store::draw_namespace();
        if self.set_identifier_namespace("", &drawn).await? {
            return Ok((true, drawn));
        }
        Ok((false, self.identifier_namespace().await?))
    }
}

/// The partition of the store's own settings.
pub(super) const META_PK: &str = "M";
/// The item holding the identifier namespace.
pub(super) const NAMESPACE_SK: &str = "namespace";

/// Separates the parts of a key: below every character a tenant id or a meter name may hold, so
/// that keys sort as their (tenant, meter, window) tuples do.
pub(super) const SEP: char = '\u{1}';

pub(super) fn quota_pk(key: &QuotaKey) -> String {
    format!("Q{SEP}{}{SEP}{}", key.tenant, key.meter)
}

pub(super) fn quota_sk(key: &QuotaKey) -> String {
    format!("{}{SEP}{}{SEP}{}", key.period_tag(), window_text(key.start), window_text(key.end))
}

pub(super) fn tenant_pk(tenant: &TenantId) -> String {
    format!("T{SEP}{tenant}")
}

pub(super) fn usage_pk(tenant: &TenantId) -> String {
    format!("U{SEP}{tenant}")
}

pub(super) fn usage_sk(meter: &str, window_start: i64) -> String {
    format!("{meter}{SEP}{}", window_text(window_start))
}

/// The sort key of an aggregate in the indexes: (tenant, meter, window) order.
pub(super) fn usage_gsk(key: &ExportKey) -> String {
    format!("{}{SEP}{}{SEP}{}", key.tenant, key.meter, window_text(key.window_start))
}

pub(super) fn key_pk(key: &KeyHash) -> String {
    format!("K{SEP}{}", key.to_hex())
}

pub(super) fn keys_gpk(tenant: &TenantId) -> String {
    format!("KEYS{SEP}{tenant}")
}

pub(super) fn idempotency_pk(key: &str) -> String {
    format!("I{SEP}{key}")
}

/// The partition of a tenant's credit grants (sort key: meter, then grant id).
pub(super) fn credit_pk(tenant: &TenantId) -> String {
    format!("CR{SEP}{tenant}")
}

pub(super) fn credit_sk(meter: &str, id: &str) -> String {
    format!("{meter}{SEP}{id}")
}

/// The marker of a payment intent's grant (one per payment): its tenant, meter and grant id.
pub(super) fn payment_pk(payment: &str) -> String {
    format!("PAY{SEP}{payment}")
}

/// The marker of a grant id of a tenant (one grant per id on every meter of the tenant).
pub(super) fn grant_id_pk(tenant: &TenantId, id: &str) -> String {
    format!("GID{SEP}{tenant}{SEP}{id}")
}

/// A refund kept until its grant lands, by payment (or invoice).
pub(super) fn kept_refund_pk(payment: &str) -> String {
    format!("REFUND{SEP}{payment}")
}

/// The count of refunds kept on one day (`REFUNDS_KEPT_MAX` shared out over their 35 days).
pub(super) fn kept_refunds_count_pk(day: i64) -> String {
    format!("REFUNDS_KEPT{SEP}{day}")
}

/// The sort key of the markers, kept refunds and counts above.
pub(super) const ONE_SK: &str = "-";

/// The index partition of open grants that expire.
pub(super) const CREDIT_DUE_GPK: &str = "CREDITDUE";

/// The partition of a tenant's shared rate (sort key [`ONE_SK`]).
pub(super) fn rate_pk(tenant: &TenantId) -> String {
    format!("R{SEP}{tenant}")
}

/// The partition of a tenant's places (sort key [`ONE_SK`]).
pub(super) fn places_pk(tenant: &TenantId) -> String {
    format!("PL{SEP}{tenant}")
}

pub(super) fn customer_pk(customer: &str) -> String {
    format!("C{SEP}{customer}")
}
