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
