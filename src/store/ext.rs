//! Reads built on the roles' own reads, for every store: object_store's `ObjectStoreExt`.

use async_trait::async_trait;

use super::{DeadLetter, DirectoryStore, ExportKey, ExportStore, StoreError, TenantRecord, UsageAggregate, UsageStore};

/// Tenants listed page by page.
const TENANT_PAGE: usize = 500;
/// Dead letters listed page by page.
const DEAD_LETTER_PAGE: usize = 100;

/// Reads of the directory built on [`DirectoryStore`]'s own: implemented for every directory
/// store by a blanket impl.
///
/// You MUST NOT implement this trait: a store implements [`DirectoryStore`], and gets these.
#[async_trait]
pub trait DirectoryStoreExt: DirectoryStore {
    /// Every tenant of the directory, in id order: [`list_tenants`](DirectoryStore::list_tenants)
    /// page by page.
    async fn all_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        let mut out: Vec<TenantRecord> = Vec::new();
        loop {
            let page = self.list_tenants(out.last().map(|t| &t.id), TENANT_PAGE).await?;
            if page.is_empty() {
                return Ok(out);
            }
            out.extend(page);
        }
    }
}

impl<T: DirectoryStore + ?Sized> DirectoryStoreExt for T {}

/// Reads of export state built on [`ExportStore`]'s own: implemented for every export store by
/// a blanket impl.
///
/// You MUST NOT implement this trait: a store implements [`ExportStore`], and gets these.
#[async_trait]
pub trait ExportStoreExt: ExportStore {
    /// The dead letter of `key`, if it is one: [`dead_letters`](ExportStore::dead_letters)
    /// page by page.
    async fn dead_letter_of(&self, key: &ExportKey) -> Result<Option<DeadLetter>, StoreError> {
        let mut after: Option<ExportKey> = None;
        loop {
            let page = self.dead_letters(after.as_ref(), DEAD_LETTER_PAGE).await?;
            let Some(last) = page.last() else { return Ok(None) };
            if let Some(d) = page.iter().find(|d| &d.key == key) {
                return Ok(Some(d.clone()));
            }
            after = Some(last.key.clone());
        }
    }
}

impl<T: ExportStore + ?Sized> ExportStoreExt for T {}

/// Reads of usage built on [`UsageStore`]'s own: implemented for every usage store by a
/// blanket impl.
///
/// You MUST NOT implement this trait: a store implements [`UsageStore`], and gets these.
#[async_trait]
pub trait UsageStoreExt: UsageStore {
    /// The aggregate of `key`, if any usage was committed to it: [`usage_range`](UsageStore::usage_range)
    /// over its window.
    async fn aggregate(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError> {
        let window = key.window_start;
        let aggregates = self.usage_range(&key.tenant, window, window.saturating_add(1)).await?;
        Ok(aggregates.into_iter().find(|a| &a.key == key))
    }
}

impl<T: UsageStore + ?Sized> UsageStoreExt for T {}
