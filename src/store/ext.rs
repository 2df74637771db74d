//! Reads built on the roles' own reads, and one release over the quota role's batch, for every
//! store: object_store's `ObjectStoreExt`.

use async_trait::async_trait;

use super::{
    DeadLetter, DirectoryStore, ExportKey, ExportStore, QuotaKey, QuotaStore, Release, ReserveToken, StoreError,
    TenantRecord, TenantUpdate, UpdateWhen, UsageAggregate, UsageStore,
};
use crate::base::{PlanId, TenantId};

/// Tenants listed page by page.
const TENANT_PAGE: usize = 500;
/// Dead letters listed page by page.
const DEAD_LETTER_PAGE: usize = 100;

/// Reads of the directory built on [`DirectoryStore`]'s own, and the tenant writes of earlier
/// versions (deprecated) over [`update_tenant`](DirectoryStore::update_tenant): implemented for
/// every directory store by a blanket impl.
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

    /// Sets (or with `None` removes) a tenant's overrides; whether the tenant exists.
    #[deprecated(note = "use `update_tenant(&TenantUpdate::Overrides(tenant, overrides), UpdateWhen::Always)`")]
    async fn set_overrides(&self, tenant: &TenantId, overrides: Option<&str>) -> Result<bool, StoreError> {
        let update = TenantUpdate::Overrides(tenant.clone(), overrides.map(str::to_owned));
        self.update_tenant(&update, UpdateWhen::Always).await
    }

    /// Sets (or with `None` removes) a tenant's Metronome customer; whether the tenant exists.
    #[deprecated(note = "use `update_tenant(&TenantUpdate::MetronomeCustomer(tenant, customer), UpdateWhen::Always)`")]
    async fn set_metronome_customer(&self, tenant: &TenantId, customer: Option<&str>) -> Result<bool, StoreError> {
        let update = TenantUpdate::MetronomeCustomer(tenant.clone(), customer.map(str::to_owned));
        self.update_tenant(&update, UpdateWhen::Always).await
    }

    /// Sets the plan of the tenant `read` describes if it is unchanged since that read.
    #[deprecated(note = "use `update_tenant(&TenantUpdate::Plan(read.id.clone(), plan), UpdateWhen::Unchanged(read))`")]
    async fn set_plan_if_unchanged(&self, read: &TenantRecord, plan: &PlanId) -> Result<bool, StoreError> {
        self.update_tenant(&TenantUpdate::Plan(read.id.clone(), plan.clone()), UpdateWhen::Unchanged(read)).await
    }

    /// Sets `tenant`'s customer if it is still `read`: over the tenant as read now, with that
    /// customer (`false`, as before, when it is not, or when the tenant changed meanwhile).
    #[deprecated(
        note = "read the tenant, then `update_tenant(&TenantUpdate::Customer(..), UpdateWhen::Unchanged(&read))`"
    )]
    async fn set_customer_if_unchanged(
        &self,
        tenant: &TenantId,
        read: Option<&str>,
        customer: Option<&str>,
    ) -> Result<bool, StoreError> {
        let Some(stored) = self.tenant(tenant).await? else { return Ok(false) };
        if stored.customer.as_deref() != read {
            return Ok(false);
        }
        let update = TenantUpdate::Customer(tenant.clone(), customer.map(str::to_owned));
        self.update_tenant(&update, UpdateWhen::Unchanged(&stored)).await
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

/// One release built on [`QuotaStore::release`]'s batch: implemented for every quota store by
/// a blanket impl.
///
/// You MUST NOT implement this trait: a store implements [`QuotaStore`], and gets this.
#[async_trait]
pub trait QuotaStoreExt: QuotaStore {
    /// Gives back `units` of `key` with `token`, its sender keeping nothing after them (a
    /// [`Release::new`]): [`release`](QuotaStore::release) of a batch of one.
    async fn release_units(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        self.release_one(Release::new(key.clone(), units, token)).await
    }

    /// [`release`](QuotaStore::release) of a batch of one.
    async fn release_one(&self, release: Release) -> Result<(), StoreError> {
        self.release(std::slice::from_ref(&release))
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::Backend("the store answered no release".into())))
    }

    /// Applies a recharge `mode` to `(tenant, meter)`'s balance: a
    /// [`reserve`](QuotaStore::reserve) of nothing on its prepaid key. Each call is a sender
    /// of its own (a random id), so that calls of several processes (a node's worker, another's
    /// webhook) are never taken for one sender's older call; the recharge modes apply once by
    /// their own rule (a failure once per recharge), so a call sent again is harmless.
    async fn apply_recharge(
        &self,
        tenant: &crate::base::TenantId,
        meter: &crate::base::MeterId,
        mode: super::RechargeMode,
        now: i64,
    ) -> Result<super::RechargeSeen, StoreError> {
        let (start, end) = crate::base::Period::Prepaid.bounds(0);
        let key = QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Prepaid, start, end);
        let token = ReserveToken::new(crate::base::draw_u64(), 1).at(now);
        Ok(self.reserve(&super::Reservation::new(key, 0, 0, None, token).recharging(mode)).await?.recharge)
    }

    /// [`ValueMode::Claim`](super::ValueMode::Claim) of [`values`](QuotaStore::values).
    async fn claim_values(&self, call: &super::ValueCall) -> Result<super::HeldValues, StoreError> {
        self.values(call, super::ValueMode::Claim).await
    }

    /// [`ValueMode::Read`](super::ValueMode::Read) of [`values`](QuotaStore::values).
    async fn read_values(&self, call: &super::ValueCall) -> Result<super::HeldValues, StoreError> {
        self.values(call, super::ValueMode::Read).await
    }

    /// [`ValueMode::Forget`](super::ValueMode::Forget) of [`values`](QuotaStore::values).
    async fn forget_values(&self, call: &super::ValueCall) -> Result<super::HeldValues, StoreError> {
        self.values(call, super::ValueMode::Forget).await
    }
}

impl<T: QuotaStore + ?Sized> QuotaStoreExt for T {}
