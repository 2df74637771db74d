//! `Admin`: the stores it administers, its constructors, and the checks its operations share.

use std::sync::Arc;

use crate::{
    config::StoreRole,
    config::{Config, PlanId, TenantId},
    engine::{BuildError, OpenStores, Opened},
    store::{
        limited::{Limited, Path, Policy},
        Actor, AuditRecord, AuditStore, DirectoryEvents, DirectoryStore, OutboxStore, QuotaStore, Setting, Store,
        TenantRecord, UsageExportStore, DEFAULT_OPERATOR,
    },
};

use super::AdminError;

/// Administration of the directory, and of the usage and dead letters of the export.
///
/// Each store call is bounded by `limits.background_timeout` (10 s without a configuration),
/// never failing fast; [`for_engine`](Self::for_engine) shares the engine's store calls.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The policy of the store calls (the engine's, for an engine's).
    pub(super) calls: Arc<Policy>,
    /// The directory and usage stores as given (what the accessors hand out: wrapping them
    /// again would count each error twice).
    pub(super) given: (Arc<dyn DirectoryStore>, Arc<dyn UsageExportStore>),
    pub(super) directory: Arc<dyn DirectoryStore>,
    pub(super) usage: Arc<dyn UsageExportStore>,
    /// The quota role, for prepaid credits ([`grant_credits`](Self::grant_credits)).
    pub(super) quota: Option<Arc<dyn QuotaStore>>,
    /// The alerts role, for the outbox ([`alerts`](Self::alerts)).
    pub(super) alerts: Option<Arc<dyn OutboxStore>>,
    /// Where each change is recorded, with `operator` as who made it
    /// ([`audit`](Self::audit)).
    pub(super) audit: Option<Arc<dyn AuditStore>>,
    pub(super) operator: String,
    pub(super) config: Option<Config>,
    /// Told of each change, when administering a running engine.
    pub(super) node: Option<Arc<dyn DirectoryEvents>>,
    /// The engine's clock when administering a running engine (the system's otherwise): what
    /// requeued alerts are due by.
    pub(super) clock: crate::clock::Clock,
    /// What reads recharge prices, when given ([`with_recharge_charger`](Self::with_recharge_charger)).
    pub(super) charger: Option<Arc<crate::billing::Charger>>,
}

impl Admin {
    /// Administers `store` (every role), without a configuration: any plan name is taken.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_roles(store.clone(), store.clone())
            .with_quota(store.clone())
            .with_alerts(store.clone())
            .with_audit(store)
    }

    /// Administers a directory and usage kept in different stores, without a configuration
    /// (and without prepaid credits unless [`with_quota`](Self::with_quota)).
    pub fn with_roles(directory: Arc<dyn DirectoryStore>, usage: Arc<dyn UsageExportStore>) -> Self {
        Self::limited(directory, usage, Policy::standalone())
    }

    /// `directory` and `usage` called by `calls`, on the background path.
    fn limited(directory: Arc<dyn DirectoryStore>, usage: Arc<dyn UsageExportStore>, calls: Arc<Policy>) -> Self {
        Self {
            directory: Arc::new(Limited::new(directory.clone(), calls.clone(), Path::Background)),
            usage: Arc::new(Limited::new(usage.clone(), calls.clone(), Path::Background)),
            given: (directory, usage),
            calls,
            quota: None,
            alerts: None,
            audit: None,
            operator: DEFAULT_OPERATOR.to_owned(),
            config: None,
            node: None,
            clock: crate::clock::Clock::system(),
            charger: None,
        }
    }

    /// With the quota store that holds prepaid credits.
    #[must_use]
    pub fn with_quota(mut self, quota: Arc<dyn QuotaStore>) -> Self {
        self.quota = Some(Arc::new(Limited::new(quota, self.calls.clone(), Path::Background)));
        self
    }

    /// With the store of the alerts outbox.
    #[must_use]
    pub fn with_alerts(mut self, alerts: Arc<dyn OutboxStore>) -> Self {
        self.alerts = Some(Arc::new(Limited::new(alerts, self.calls.clone(), Path::Background)));
        self
    }

    /// With the store of the audit of tenants' settings (the directory's): each change made
    /// through this `Admin` is recorded there, by [`operator`](Self::operator). Without it,
    /// changes are not recorded, and [`audit`](Self::audit) answers [`AdminError::Invalid`]
    /// ([`new`](Self::new), [`open`](Self::open) and [`for_engine`](Self::for_engine) have it).
    #[must_use]
    pub fn with_audit(mut self, audit: Arc<dyn AuditStore>) -> Self {
        self.audit = Some(Arc::new(Limited::new(audit, self.calls.clone(), Path::Background)));
        self
    }

    /// The operator each change is recorded as made by (`ana@ops`, the CLI's
    /// `--operator` or `$TOLLGATE_OPERATOR`); [`DEFAULT_OPERATOR`] unless given. Cut at
    /// [`AUDIT_ACTOR_MAX`](crate::store::AUDIT_ACTOR_MAX) bytes.
    #[must_use]
    pub fn operator(mut self, name: impl Into<String>) -> Self {
        self.operator = name.into();
        self
    }

    /// Records a change of `tenant`'s `setting` made through this `Admin`, if its values
    /// differ (an audit store given): after the change was written, as the directory's feed
    /// is told.
    pub(super) async fn record(
        &self,
        tenant: &TenantId,
        setting: Setting,
        before: Option<String>,
        after: Option<String>,
    ) {
        let Some(audit) = &self.audit else { return };
        if before == after {
            return;
        }
        let at = self.clock.unix_nanos() / 1_000_000;
        let record =
            AuditRecord::new(tenant.clone(), at, Actor::Operator(self.operator.clone()), setting, before, after);
        crate::store::append_audit(audit.as_ref(), &record).await;
    }

    /// Administers the stores of a running engine, with its configuration: the engine sees
    /// its own changes at once (the other nodes within a second, through the directory's feed
    /// of tenants changed).
    #[must_use]
    pub fn for_engine(engine: &crate::engine::Tollgate) -> Self {
        let stores = engine.shared().stores();
        Self {
            calls: stores.policy().clone(),
            given: (stores.given().directory.clone(), stores.given().usage.clone()),
            directory: stores.background().directory.clone(),
            usage: stores.background().usage.clone(),
            quota: Some(stores.background().quota.clone()),
            alerts: Some(stores.background().alerts.clone()),
            audit: Some(stores.background().audit.clone()),
            operator: DEFAULT_OPERATOR.to_owned(),
            config: Some(engine.config()),
            node: Some(Arc::new(engine.clone())),
            clock: engine.clock().clone(),
            // The engine's own charger reads the price as the engine charges it.
            charger: engine.recharge_charger(),
        }
    }

    /// Drops what the engine (if any) holds of `tenant`: its next request reads the directory;
    /// and tells the directory's feed, so that every node reads it again within a second.
    pub(super) async fn changed(&self, tenant: &TenantId) {
        if let Some(node) = &self.node {
            node.tenant_changed(tenant);
        }
        crate::store::tell_changed(self.directory.as_ref(), tenant, self.clock.unix_nanos() / 1_000_000).await;
    }

    /// Tells the engine (if any) that keys were added by their hashes: it forgets the
    /// credentials it remembers as unknown.
    pub(super) fn keys_added(&self) {
        if let Some(node) = &self.node {
            node.keys_added();
        }
    }

    /// Plans are checked against `config`, and store calls bounded by its
    /// `limits.background_timeout` (an engine's follow the engine's configuration).
    #[must_use]
    pub fn with_config(mut self, config: Config) -> Self {
        if self.node.is_none() {
            self.calls.configure(&config);
        }
        self.config = Some(config);
        self
    }

    /// Opens the stores `config` names for the directory and usage roles (`[store]`, or
    /// `[store.directory]` and `[store.usage]` where the file has them; with the standard AWS
    /// environment for DynamoDB) and checks plans against `config`.
    ///
    /// # Errors
    /// The store could not be opened, or its kind needs a cargo feature this build lacks.
    pub async fn open(config: &Config) -> Result<Self, BuildError> {
        let mut open = OpenStores::default();
        let directory = open.serving(config, StoreRole::Directory, Opened::directory).await?;
        let usage = open.serving(config, StoreRole::Usage, Opened::usage).await?;
        let quota = open.serving(config, StoreRole::Quota, Opened::quota).await?;
        let alerts = open.serving(config, StoreRole::Alerts, Opened::alerts).await?;
        let audit = open.serving(config, StoreRole::Directory, Opened::audit).await?;
        let calls = Policy::standalone();
        Ok(Self::limited(directory, usage, calls)
            .with_quota(quota)
            .with_alerts(alerts)
            .with_audit(audit)
            .with_config(config.clone()))
    }

    /// The directory administered.
    pub fn directory_store(&self) -> &Arc<dyn DirectoryStore> {
        &self.given.0
    }

    /// The usage (and its export) administered.
    pub fn usage_store(&self) -> &Arc<dyn UsageExportStore> {
        &self.given.1
    }

    /// The plan a tenant is put on by an operator naming `plan`: its current version for a
    /// plan's name, that version for a version's id (`pro@2`). Without a configuration, as
    /// named.
    pub(super) fn plan(&self, plan: &str) -> Result<PlanId, AdminError> {
        match &self.config {
            Some(c) => c.put_on(plan).map(|p| p.id().clone()).ok_or_else(|| AdminError::UnknownPlan(plan.to_owned())),
            None => Ok(PlanId::from(plan)),
        }
    }

    pub(super) fn tenant_id(id: &str) -> Result<TenantId, AdminError> {
        if TenantId::is_valid(id) {
            Ok(TenantId::from(id))
        } else {
            Err(AdminError::Invalid(format!("`{id}` is not a tenant id: 1 to 128 visible ASCII characters")))
        }
    }

    pub(super) async fn existing(&self, id: &str) -> Result<TenantRecord, AdminError> {
        let tenant = Self::tenant_id(id)?;
        self.directory.tenant(&tenant).await?.ok_or_else(|| AdminError::UnknownTenant(id.to_owned()))
    }
}
