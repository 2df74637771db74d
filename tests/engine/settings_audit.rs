//! The audit of tenants' settings on the memory store (the other stores run the same
//! scenario in tests/store: SQLite, PostgreSQL, DynamoDB).

use std::sync::Arc;

use crate::common;

/// tests/common/settings_audit.rs, on the memory store.
#[tokio::test]
async fn every_source_records_its_changes_in_memory() {
    common::settings_audit::every_source_records_its_changes(Arc::new(tollgate::store::MemoryStore::new())).await;
}
