//! The directory's administration, for the `tollgate` command and for teams that build their own
//! admin pages: tenants and their plans, API keys (issued, listed, rotated, revoked, imported),
//! the usage a tenant was billed, and the dead letters of the export. It works on the directory
//! role ([`DirectoryStore`]) and the usage and export roles ([`UsageExportStore`]) of any store,
//! and checks plans against the configuration.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use tollgate::admin::{Admin, KeyOptions};
//!
//! let config = tollgate::Config::from_toml_str("[store]\nkind = \"memory\"\n[plans.free]\nrate = \"10/s\"\n").unwrap();
//! let admin = Admin::open(&config).await.unwrap();
//! admin.add_tenant("acme", "free", None).await.unwrap();
//! let issued = admin.issue_key("acme", KeyOptions::default()).await.unwrap();
//! assert!(issued.key.starts_with("tg_live_")); // shown once: only its hash is stored
//! assert_eq!(admin.keys("acme").await.unwrap()[0].id, issued.record.id);
//! # }
//! ```

use std::sync::Arc;

use crate::store::KeyHash;
use crate::{
    config::StoreRole,
    config::{Config, MeterId, PlanId, TenantId},
    engine::{BuildError, OpenStores},
    store::{
        limited::{Limited, Path, Policy},
        unix_now, ApiKeyRecord, CreditBalance, CreditClosure, CreditGrant, DeadLetter, DirectoryEvents, DirectoryStore,
        DirectoryStoreExt, ExportKey, ExportStoreExt, GrantOutcome, QuotaStore, Store, StoreError, TenantRecord,
        TenantUpdate, UpdateWhen, UsageAggregate, UsageExportStore, UsageStoreExt,
    },
};

/// How many characters of a key are kept to recognise it by (`tg_live_ab12`).
const PREFIX_CHARS: usize = 12;

/// Why an administrative operation was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The plan is not in the configuration.
    #[error("no plan `{0}` in the configuration")]
    UnknownPlan(String),
    /// No such tenant.
    #[error("no tenant `{0}`")]
    UnknownTenant(String),
    /// The tenant exists already.
    #[error("tenant `{0}` exists already")]
    TenantExists(String),
    /// The tenant has no key with this id.
    #[error("tenant `{tenant}` has no key `{id}`")]
    UnknownKey {
        /// The tenant.
        tenant: String,
        /// The key id asked for.
        id: String,
    },
    /// A value is not valid (a tenant id, a customer id).
    #[error("{0}")]
    Invalid(String),
    /// The billing customer belongs to another tenant: moving it would make that tenant's
    /// usage unbillable and send its customer's webhooks to this one.
    #[error("billing customer `{customer}` belongs to tenant `{holder}`: a customer belongs to one tenant; move it explicitly (--move) if that is meant")]
    CustomerHeld {
        /// The customer.
        customer: String,
        /// The tenant holding it.
        holder: String,
    },
    /// A line of an import is not valid: nothing was imported.
    #[error("line {line}: {message}")]
    Import {
        /// The line (1-based, the header is line 1).
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

/// How a key is issued.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct KeyOptions {
    /// From when it no longer works (Unix seconds), if ever.
    pub expires_at: Option<i64>,
    /// `tg_test_` keys instead of `tg_live_` ones (the same otherwise: a name for people).
    pub test: bool,
}

impl KeyOptions {
    /// A `tg_test_` key if `test`.
    #[must_use]
    pub fn test(mut self, test: bool) -> Self {
        self.test = test;
        self
    }

    /// Expiring at `at` (Unix seconds).
    #[must_use]
    pub fn expiring(mut self, at: i64) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// A key just issued: the only time the key itself is seen.
#[derive(Clone)]
#[non_exhaustive]
pub struct IssuedKey {
    /// The key, to hand to the customer. Not stored anywhere.
    pub key: String,
    /// What the directory keeps of it.
    pub record: ApiKeyRecord,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey").field("key", &"…").field("record", &self.record).finish()
    }
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportReport {
    /// Tenants created.
    pub tenants_created: usize,
    /// Tenants whose plan or customer changed.
    pub tenants_updated: usize,
    /// Keys written.
    pub keys: usize,
}

/// What a directory copy did ([`Admin::copy_directory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyReport {
    /// Tenants written to the other store (created, or replaced by the copied record).
    pub tenants: usize,
    /// API keys written (their hashes, ids, prefixes, creation and expiry times).
    pub keys: usize,
}

/// Administration of the directory, and of the usage and dead letters of the export.
///
/// Each store call is bounded by `limits.background_timeout` (10 s without a configuration),
/// never failing fast; [`for_engine`](Self::for_engine) shares the engine's store calls.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The policy of the store calls (the engine's, for an engine's).
    calls: Arc<Policy>,
    /// The directory and usage stores as given (what the accessors hand out: wrapping them
    /// again would count each error twice).
    given: (Arc<dyn DirectoryStore>, Arc<dyn UsageExportStore>),
    directory: Arc<dyn DirectoryStore>,
    usage: Arc<dyn UsageExportStore>,
    /// The quota role, for prepaid credits ([`grant_credits`](Self::grant_credits)).
    quota: Option<Arc<dyn QuotaStore>>,
    config: Option<Config>,
    /// Told of each change, when administering a running engine.
    node: Option<Arc<dyn DirectoryEvents>>,
}

/// How many times `set_plan` reads the tenant again when its plan changed under it.
const SET_PLAN_ATTEMPTS: usize = 5;

impl Admin {
    /// Administers `store` (every role), without a configuration: any plan name is taken.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_roles(store.clone(), store.clone()).with_quota(store)
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
            config: None,
            node: None,
        }
    }

    /// With the quota store that holds prepaid credits.
    #[must_use]
    pub fn with_quota(mut self, quota: Arc<dyn QuotaStore>) -> Self {
        self.quota = Some(Arc::new(Limited::new(quota, self.calls.clone(), Path::Background)));
        self
    }

    /// Administers the stores of a running engine, with its configuration: the engine sees
    /// its own changes at once (the other nodes within `limits.directory_ttl`).
    #[must_use]
    pub fn for_engine(engine: &crate::engine::Tollgate) -> Self {
        let stores = engine.shared.stores();
        Self {
            calls: stores.policy().clone(),
            given: (stores.given().directory.clone(), stores.given().usage.clone()),
            directory: stores.background().directory.clone(),
            usage: stores.background().usage.clone(),
            quota: Some(stores.background().quota.clone()),
            config: Some(engine.config()),
            node: Some(Arc::new(engine.clone())),
        }
    }

    /// Drops what the engine (if any) holds of `tenant`: its next request reads the directory.
    fn changed(&self, tenant: &TenantId) {
        if let Some(node) = &self.node {
            node.tenant_changed(tenant);
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
        let directory = open.role(config, StoreRole::Directory).await?;
        let usage = open.role(config, StoreRole::Usage).await?;
        let quota = open.role(config, StoreRole::Quota).await?;
        let calls = Policy::standalone();
        Ok(Self::limited(directory, usage, calls).with_quota(quota).with_config(config.clone()))
    }

    /// The directory administered.
    pub fn directory_store(&self) -> &Arc<dyn DirectoryStore> {
        &self.given.0
    }

    /// The usage (and its export) administered.
    pub fn usage_store(&self) -> &Arc<dyn UsageExportStore> {
        &self.given.1
    }

    fn plan(&self, plan: &str) -> Result<PlanId, AdminError> {
        let id = PlanId::from(plan);
        match &self.config {
            Some(c) if c.plan(&id).is_none() => Err(AdminError::UnknownPlan(plan.to_owned())),
            _ => Ok(id),
        }
    }

    fn tenant_id(id: &str) -> Result<TenantId, AdminError> {
        if TenantId::is_valid(id) {
            Ok(TenantId::from(id))
        } else {
            Err(AdminError::Invalid(format!("`{id}` is not a tenant id: 1 to 128 visible ASCII characters")))
        }
    }

    async fn existing(&self, id: &str) -> Result<TenantRecord, AdminError> {
        let tenant = Self::tenant_id(id)?;
        self.directory.tenant(&tenant).await?.ok_or_else(|| AdminError::UnknownTenant(id.to_owned()))
    }

    /// Adds a tenant on `plan`, with a billing customer (a Stripe customer id) if given. A
    /// customer belongs to one tenant: one another tenant holds is refused
    /// ([`add_tenant_moving_customer`](Self::add_tenant_moving_customer) moves it).
    ///
    /// # Errors
    /// The tenant exists, the plan is unknown, [`AdminError::CustomerHeld`], or the store
    /// failed.
    pub async fn add_tenant(&self, id: &str, plan: &str, customer: Option<&str>) -> Result<TenantRecord, AdminError> {
        self.add(id, plan, customer, false).await
    }

    /// [`add_tenant`](Self::add_tenant), taking the billing customer from the tenant that
    /// holds it, if one does (that tenant keeps no customer).
    ///
    /// # Errors
    /// The tenant exists, an unknown plan, a bad id, or the store failed.
    pub async fn add_tenant_moving_customer(
        &self,
        id: &str,
        plan: &str,
        customer: &str,
    ) -> Result<TenantRecord, AdminError> {
        self.add(id, plan, Some(customer), true).await
    }

    /// [`add_tenant`](Self::add_tenant) (or, with `take`,
    /// [`add_tenant_moving_customer`](Self::add_tenant_moving_customer)), with a Metronome
    /// customer id or ingest alias: what its usage events carry when the billing sink is
    /// Metronome.
    ///
    /// # Errors
    /// As [`add_tenant`](Self::add_tenant), and a Metronome customer that is empty, longer than
    /// 255 bytes or holds control characters.
    pub async fn add_tenant_with_metronome_customer(
        &self,
        id: &str,
        plan: &str,
        customer: Option<&str>,
        metronome_customer: &str,
        take: bool,
    ) -> Result<TenantRecord, AdminError> {
        let m = check_metronome_customer(metronome_customer)?;
        self.add_record(id, plan, customer, Some(m), take).await
    }

    async fn add(&self, id: &str, plan: &str, customer: Option<&str>, take: bool) -> Result<TenantRecord, AdminError> {
        self.add_record(id, plan, customer, None, take).await
    }

    async fn add_record(
        &self,
        id: &str,
        plan: &str,
        customer: Option<&str>,
        metronome_customer: Option<&str>,
        take: bool,
    ) -> Result<TenantRecord, AdminError> {
        let tenant = Self::tenant_id(id)?;
        let plan = self.plan(plan)?;
        if self.directory.tenant(&tenant).await?.is_some() {
            return Err(AdminError::TenantExists(id.to_owned()));
        }
        let mut record = TenantRecord::new(tenant, plan);
        record.metronome_customer = metronome_customer.map(str::to_owned);
        if let Some(c) = customer {
            let c = check_customer(c)?;
            if !take {
                self.refuse_held(c, &record.id).await?;
            }
            record = record.with_customer(c);
        }
        self.directory.put_tenant(&record, &[]).await?;
        Ok(record)
    }

    /// Sets (or, with `None`, removes) a tenant's billing customer: the fix for a wrong one.
    /// With `take`, a customer another tenant holds is moved from it; without, that is refused.
    /// Written over the customer read only, and nothing else of the tenant: a plan change a
    /// webhook applies meanwhile is kept. Its windows waiting for export are billed to the new
    /// customer (exports in flight keep the customer they began with); usage it had flushed
    /// while it had no customer on a plan that is not `billed` was not billable and stays so,
    /// and the windows of a tenant left without a customer (`None`, or the holder under `take`)
    /// are no longer billed unless its plan is `billed`.
    ///
    /// # Errors
    /// No such tenant, a bad customer id, [`AdminError::CustomerHeld`], or the store failed.
    pub async fn set_customer(&self, id: &str, customer: Option<&str>, take: bool) -> Result<TenantRecord, AdminError> {
        let customer = customer.map(check_customer).transpose()?;
        for _ in 0..SET_PLAN_ATTEMPTS {
            let mut record = self.existing(id).await?;
            if let (Some(c), false) = (customer, take) {
                self.refuse_held(c, &record.id).await?;
            }
            let update = TenantUpdate::Customer(record.id.clone(), customer.map(str::to_owned));
            if self.directory.update_tenant(&update, UpdateWhen::Unchanged(&record)).await? {
                record.customer = customer.map(str::to_owned);
                self.changed(&record.id);
                return Ok(record);
            }
        }
        Err(AdminError::Store(StoreError::Conflict("the tenant's customer (it kept changing)")))
    }

    /// [`AdminError::CustomerHeld`] if a tenant other than `tenant` holds `customer`.
    async fn refuse_held(&self, customer: &str, tenant: &TenantId) -> Result<(), AdminError> {
        // A tenant of the configuration file holds it (its webhooks answer `file_tenant`).
        if let Some(config) = &self.config {
            if let Some(t) = config.tenants().iter().find(|t| t.stripe_customer() == Some(customer) && t.id() != tenant)
            {
                return Err(AdminError::CustomerHeld {
                    customer: customer.to_owned(),
                    holder: format!("{} (in the configuration file)", t.id()),
                });
            }
        }
        match self.directory.tenant_by_customer(customer).await? {
            Some(holder) if &holder.id != tenant => {
                Err(AdminError::CustomerHeld { customer: customer.to_owned(), holder: holder.id.to_string() })
            }
            _ => Ok(()),
        }
    }

    /// Moves a tenant to another plan. Running nodes see it within `limits.directory_ttl`.
    ///
    /// # Errors
    /// No such tenant, an unknown plan, or the store failed.
    pub async fn set_plan(&self, id: &str, plan: &str) -> Result<TenantRecord, AdminError> {
        let plan = self.plan(plan)?;
        // Written only over what was read: a webhook applied meanwhile is read again (its plan
        // replaced, its event time kept, so an older event delivered late stays stale).
        for _ in 0..SET_PLAN_ATTEMPTS {
            let mut record = self.existing(id).await?;
            if let (Some(config), Some(json)) = (&self.config, &record.overrides) {
                // The tenant's overrides must hold over the new plan too.
                let o = crate::config::PlanOverride::from_json(json, config)
                    .map_err(|e| AdminError::Invalid(e.to_string()))?;
                config.check_override(&plan, &o).map_err(|e| {
                    AdminError::Invalid(format!("the tenant's overrides do not fit plan `{plan}`: {e}"))
                })?;
            }
            let update = TenantUpdate::Plan(record.id.clone(), plan.clone());
            if self.directory.update_tenant(&update, UpdateWhen::Unchanged(&record)).await? {
                record.plan = plan;
                self.changed(&record.id);
                return Ok(record);
            }
        }
        Err(AdminError::Store(StoreError::Conflict("the tenant's plan (webhooks kept changing it)")))
    }

    /// Sets a tenant's overrides of its plan (their JSON form, the keys of
    /// `[tenants.X.overrides]`: `rate`, `burst`, `quotas`, `features`), checked against the
    /// configuration; `None` removes them. Only the overrides change (a plan change made at
    /// the same moment is kept). Running nodes see it within `limits.directory_ttl`.
    ///
    /// # Errors
    /// No such tenant, overrides that are not valid for the configuration (or no
    /// configuration to check them against), or the store failed.
    pub async fn set_overrides(&self, id: &str, overrides: Option<&str>) -> Result<TenantRecord, AdminError> {
        let tenant = Self::tenant_id(id)?;
        let json = match overrides {
            None => None,
            Some(text) => {
                let Some(config) = &self.config else {
                    return Err(AdminError::Invalid(
                        "overrides are checked against a configuration: none is given".into(),
                    ));
                };
                let o = crate::config::PlanOverride::from_json(text, config)
                    .map_err(|e| AdminError::Invalid(e.to_string()))?;
                let record = self.existing(id).await?;
                config.check_override(&record.plan, &o).map_err(AdminError::Invalid)?;
                (!o.is_empty()).then(|| o.to_json())
            }
        };
        if !self.directory.update_tenant(&TenantUpdate::Overrides(tenant.clone(), json), UpdateWhen::Always).await? {
            return Err(AdminError::UnknownTenant(id.to_owned()));
        }
        self.changed(&tenant);
        self.existing(id).await
    }

    /// Sets (or, with `None`, removes) a tenant's Metronome customer id or ingest alias: what
    /// its usage events carry with `export.sink = "metronome"`. Nothing else of the tenant
    /// changes. Its windows waiting for export are billed to the new customer (exports in
    /// flight keep the customer they began with). Running nodes see it within
    /// `limits.directory_ttl`.
    ///
    /// # Errors
    /// No such tenant, a customer that is empty, longer than 255 bytes or holds control
    /// characters, or the store failed.
    pub async fn set_metronome_customer(&self, id: &str, customer: Option<&str>) -> Result<TenantRecord, AdminError> {
        let tenant = Self::tenant_id(id)?;
        let customer = customer.map(check_metronome_customer).transpose()?;
        let update = TenantUpdate::MetronomeCustomer(tenant.clone(), customer.map(str::to_owned));
        if !self.directory.update_tenant(&update, UpdateWhen::Always).await? {
            return Err(AdminError::UnknownTenant(id.to_owned()));
        }
        self.changed(&tenant);
        self.existing(id).await
    }

    fn quota(&self) -> Result<&Arc<dyn QuotaStore>, AdminError> {
        self.quota.as_ref().ok_or_else(|| {
            AdminError::Invalid("prepaid credits live in the quota store: none is given (Admin::with_quota)".into())
        })
    }

    fn credit_meter(&self, meter: &str) -> Result<MeterId, AdminError> {
        let id = MeterId::from(meter);
        match &self.config {
            Some(c) if !c.meters().iter().any(|m| m.id() == &id) => {
                Err(AdminError::Invalid(format!("`{meter}` is not a meter of the configuration")))
            }
            _ => Ok(id),
        }
    }

    /// Grants `units` prepaid units to `tenant` on `meter`, expiring at `expires_at` (Unix
    /// seconds) if given, under `grant_id`: the balance grows by them in the same write that
    /// records the grant, once per id (a grant sent again under its id adds nothing and answers
    /// [`GrantOutcome::Duplicate`]). Grants are spent soonest-to-expire first. Running nodes
    /// lease from the new balance at their next refill.
    ///
    /// # Errors
    /// A bad tenant id, a meter the configuration lacks, no units, an expiry not in the
    /// future, an empty or overlong grant id, no quota store, or the store failed.
    pub async fn grant_credits(
        &self,
        tenant: &str,
        meter: &str,
        units: u64,
        expires_at: Option<i64>,
        grant_id: &str,
    ) -> Result<GrantOutcome, AdminError> {
        let tenant_id = Self::tenant_id(tenant)?;
        let meter = self.credit_meter(meter)?;
        if units == 0 || units > crate::base::MAX_BALANCE {
            return Err(AdminError::Invalid(format!("{units} units: a grant holds 1 to 2^50 units")));
        }
        // A tenant of the directory or of the file: a typo never makes a balance of its own.
        let filed = self.config.as_ref().is_some_and(|c| c.tenants().iter().any(|t| t.id() == &tenant_id));
        if !filed && self.directory.tenant(&tenant_id).await?.is_none() {
            return Err(AdminError::UnknownTenant(tenant.to_owned()));
        }
        let tenant = tenant_id;
        let now = unix_now();
        if expires_at.is_some_and(|at| at <= now) {
            return Err(AdminError::Invalid("the grant would expire before it is made".into()));
        }
        if grant_id.is_empty() || grant_id.len() > 255 || !grant_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AdminError::Invalid(format!(
                "`{grant_id}` is not a grant id: 1 to 255 visible ASCII characters"
            )));
        }
        let grant = CreditGrant::new(tenant.clone(), meter, grant_id, units, now).expiring(expires_at);
        let outcome = self.quota()?.grant_credits(&grant).await?;
        self.changed(&tenant);
        Ok(outcome)
    }

    /// A tenant's quota counters in the store, on every meter of the configuration (by meter,
    /// then period start): what each holds, leases included (see
    /// [`QuotaStore::counters`]). With every node stopped,
    /// what was used.
    ///
    /// # Errors
    /// A bad tenant id, no configuration or quota store, or the store failed.
    pub async fn quota_counters(&self, tenant: &str) -> Result<Vec<crate::store::QuotaCounter>, AdminError> {
        let tenant = Self::tenant_id(tenant)?;
        let config =
            self.config.as_ref().ok_or_else(|| AdminError::Invalid("no configuration to read the meters of".into()))?;
        let quota = self.quota()?;
        let mut out = Vec::new();
        for meter in config.meters() {
            out.extend(quota.counters(&tenant, meter.id()).await?);
        }
        Ok(out)
    }

    /// A tenant's credit grants (open, and closed ones kept: at least 35 days) by meter and
    /// spending order,
    /// with the balance of each meter.
    ///
    /// # Errors
    /// A bad tenant id, no quota store, or the store failed.
    pub async fn credits(&self, tenant: &str) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), AdminError> {
        let tenant = Self::tenant_id(tenant)?;
        Ok(self.quota()?.credit_grants(&tenant, None).await?)
    }

    /// Revokes an open grant at once: the units it still holds (units used are taken from the
    /// soonest-to-expire grants first) leave the balance. `meter` may be left out when the id
    /// names one grant of the tenant.
    ///
    /// # Errors
    /// No such open grant, an id that names grants on several meters without `meter`, no quota
    /// store, or the store failed.
    pub async fn revoke_credits(
        &self,
        tenant: &str,
        meter: Option<&str>,
        grant_id: &str,
    ) -> Result<CreditClosure, AdminError> {
        let tenant_id = Self::tenant_id(tenant)?;
        let quota = self.quota()?;
        let (grants, _) = quota.credit_grants(&tenant_id, meter.map(MeterId::from).as_ref()).await?;
        let open: Vec<&CreditGrant> = grants.iter().filter(|g| g.id == grant_id && g.closed.is_none()).collect();
        let grant = match open.as_slice() {
            [one] => *one,
            [] => return Err(AdminError::Invalid(format!("{tenant} has no open grant `{grant_id}`"))),
            _ => {
                return Err(AdminError::Invalid(format!(
                    "{tenant} has grants `{grant_id}` on several meters: name the meter"
                )))
            }
        };
        let closed = quota.close_credits(&tenant_id, &grant.meter, grant_id, true, unix_now()).await?;
        self.changed(&tenant_id);
        closed.ok_or_else(|| AdminError::Invalid(format!("{tenant} has no open grant `{grant_id}`")))
    }

    /// Every tenant of the directory, in id order.
    ///
    /// # Errors
    /// The store failed.
    pub async fn tenants(&self) -> Result<Vec<TenantRecord>, AdminError> {
        Ok(self.directory.all_tenants().await?)
    }

    /// Copies the directory to another directory store: every tenant with its plan, billing
    /// customer, overrides, subscriptions and last webhook time, and every API key (its hash,
    /// id, prefix, creation and expiry). For a team moving from one store to another (a SQLite
    /// file to PostgreSQL): tenants the other store holds are replaced by the copied record,
    /// other tenants and keys there are left, and running it again writes the same records
    /// again. Quota counters, usage and its export state are not copied: they stay in the
    /// store that holds them until exported (see the PostgreSQL guide, "Moving to it").
    ///
    /// # Errors
    /// Either store failed; what was written before stays (running it again finishes it).
    pub async fn copy_directory(&self, to: &dyn DirectoryStore) -> Result<CopyReport, AdminError> {
        let mut report = CopyReport::default();
        let mut after: Option<TenantId> = None;
        loop {
            let page = self.directory.list_tenants(after.as_ref(), 500).await?;
            let Some(last) = page.last() else { return Ok(report) };
            after = Some(last.id.clone());
            for tenant in &page {
                self.calls.call(Path::Background, "put tenant", to.put_tenant(tenant, &[])).await?;
                report.tenants += 1;
                for key in self.directory.list_keys(&tenant.id).await? {
                    self.calls.call(Path::Background, "put key", to.put_key(&key)).await?;
                    report.keys += 1;
                }
            }
        }
    }

    /// Issues a new key for a tenant: returned once, stored as its hash with its id, its first
    /// characters and its expiry.
    ///
    /// # Errors
    /// No such tenant, or the store failed.
    pub async fn issue_key(&self, tenant: &str, options: KeyOptions) -> Result<IssuedKey, AdminError> {
        let record = self.existing(tenant).await?;
        let key = new_key(options.test)?;
        let stored = ApiKeyRecord::new(KeyHash::of(key.as_bytes()), record.id, unix_now())
            .with_prefix(&key[..PREFIX_CHARS])
            .with_expiry(options.expires_at);
        self.directory.put_key(&stored).await?;
        Ok(IssuedKey { key, record: stored })
    }

    /// Rotates a key: issues a new one, and keeps the old one working until `grace_until`
    /// (Unix seconds) so clients can move over.
    ///
    /// # Errors
    /// No such tenant or key, or the store failed.
    pub async fn rotate_key(&self, tenant: &str, id: &str, grace_until: i64) -> Result<IssuedKey, AdminError> {
        let old = self.key(tenant, id).await?;
        let issued = self.issue_key(tenant, KeyOptions::default()).await?;
        let until = old.expires_at.map_or(grace_until, |at| at.min(grace_until));
        let tenant = old.tenant.clone();
        self.directory.put_key(&old.with_expiry(Some(until))).await?;
        self.changed(&tenant);
        Ok(issued)
    }

    /// The keys of a tenant (expired ones included), in id order.
    ///
    /// # Errors
    /// No such tenant, or the store failed.
    pub async fn keys(&self, tenant: &str) -> Result<Vec<ApiKeyRecord>, AdminError> {
        let record = self.existing(tenant).await?;
        Ok(self.directory.list_keys(&record.id).await?)
    }

    async fn key(&self, tenant: &str, id: &str) -> Result<ApiKeyRecord, AdminError> {
        let keys = self.keys(tenant).await?;
        keys.into_iter()
            .find(|k| k.id == id)
            .ok_or_else(|| AdminError::UnknownKey { tenant: tenant.to_owned(), id: id.to_owned() })
    }

    /// Revokes a key at once. Running nodes stop taking it within `limits.directory_ttl`
    /// (at once on a node that is told through [`Tollgate::invalidate_key`](crate::Tollgate::invalidate_key)).
    ///
    /// # Errors
    /// No such tenant or key, or the store failed.
    pub async fn revoke_key(&self, tenant: &str, id: &str) -> Result<ApiKeyRecord, AdminError> {
        let key = self.key(tenant, id).await?;
        self.directory.remove_key(&key.hash).await?;
        self.changed(&key.tenant);
        Ok(key)
    }

    /// Imports tenants, plans, billing customers and existing keys (or their SHA-256 hashes)
    /// from CSV text, so that clients keep their keys (moving off API Gateway usage plans,
    /// say). The header names the columns, in any order: `tenant` (required), `plan`
    /// (required for a tenant new to the directory), `customer`, `key` or `key_sha256`,
    /// `expires_at` (Unix seconds). Every line is checked before anything is written: a bad
    /// line is an error naming it, and nothing is imported. Importing the same file again
    /// changes nothing.
    ///
    /// # Errors
    /// A bad line (nothing imported), or the store failed (lines before it were imported;
    /// importing again is safe).
    pub async fn import_csv(&self, text: &str) -> Result<ImportReport, AdminError> {
        let rows = parse_import(text, |p| self.plan(p).map(drop))?;
        // Checked against the directory before anything is written: a tenant new to it needs a
        // plan on its first line.
        let mut known = std::collections::HashSet::new();
        for row in &rows {
            if known.contains(&row.tenant) {
                continue;
            }
            if row.plan.is_none() && self.directory.tenant(&row.tenant).await?.is_none() {
                return Err(AdminError::Import {
                    line: row.line,
                    message: format!("tenant `{}` is new: it needs a plan", row.tenant),
                });
            }
            known.insert(row.tenant.clone());
        }
        // A customer belongs to one tenant: an import never moves one silently.
        let mut given: std::collections::HashMap<&str, &TenantId> = std::collections::HashMap::new();
        for row in &rows {
            let Some(c) = row.customer.as_deref() else { continue };
            let holder = match given.get(c) {
                Some(t) => Some((*t).clone()),
                None => self.directory.tenant_by_customer(c).await?.map(|t| t.id),
            };
            if let Some(holder) = holder.filter(|h| h != &row.tenant) {
                return Err(AdminError::Import {
                    line: row.line,
                    message: format!(
                        "billing customer `{c}` belongs to tenant `{holder}` (a customer belongs to one tenant: \
                         tollgate tenants set-customer … --move moves it)"
                    ),
                });
            }
            given.insert(c, &row.tenant);
        }
        for row in &rows {
            if let Some((hash, _)) = &row.key {
                if let Some(owner) = self.directory.find_key(hash).await?.filter(|t| t.id != row.tenant) {
                    return Err(AdminError::Import {
                        line: row.line,
                        message: format!("the key belongs to tenant `{}`", owner.id),
                    });
                }
            }
        }
        let mut report = ImportReport::default();
        for row in rows {
            let line = row.line;
            let current = self.directory.tenant(&row.tenant).await?;
            let record = match current {
                None => {
                    let Some(plan) = row.plan.clone() else {
                        return Err(AdminError::Import {
                            line,
                            message: format!("tenant `{}` is new: it needs a plan", row.tenant),
                        });
                    };
                    let mut r = TenantRecord::new(row.tenant.clone(), plan);
                    r.customer = row.customer.clone();
                    self.directory.put_tenant(&r, &[]).await?;
                    report.tenants_created += 1;
                    r
                }
                Some(mut r) => {
                    let before = r.clone();
                    if let Some(plan) = &row.plan {
                        r.plan = plan.clone();
                    }
                    if row.customer.is_some() {
                        r.customer = row.customer.clone();
                    }
                    if r != before {
                        self.directory.put_tenant(&r, &[]).await?;
                        report.tenants_updated += 1;
                    }
                    r
                }
            };
            if let Some((hash, prefix)) = row.key {
                // A key the tenant holds keeps what the line does not say (its expiry, say,
                // during a rotation's grace): importing the same file again changes nothing.
                let held = self.directory.list_keys(&record.id).await?.into_iter().find(|k| k.hash == hash);
                let key = match held {
                    Some(k) => {
                        let expiry = row.expires_at.or(k.expires_at);
                        let prefix = if k.prefix.is_empty() { prefix } else { k.prefix.clone() };
                        k.with_prefix(prefix).with_expiry(expiry)
                    }
                    None => ApiKeyRecord::new(hash, record.id.clone(), unix_now())
                        .with_prefix(prefix)
                        .with_expiry(row.expires_at),
                };
                self.directory.put_key(&key).await.map_err(|e| match e {
                    StoreError::Conflict(_) => {
                        AdminError::Import { line, message: "the key belongs to another tenant".to_owned() }
                    }
                    e => AdminError::Store(e),
                })?;
                report.keys += 1;
            }
            self.changed(&record.id);
        }
        Ok(report)
    }

    /// The usage of a tenant in the windows starting in `[from, to)` (Unix seconds), of one
    /// meter or all, with what was exported of it.
    ///
    /// # Errors
    /// The store failed.
    pub async fn usage(
        &self,
        tenant: &str,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<UsageAggregate>, AdminError> {
        let tenant = Self::tenant_id(tenant)?;
        let all = self.usage.usage_range(&tenant, from, to).await?;
        let meter = meter.map(MeterId::from);
        Ok(all.into_iter().filter(|a| meter.as_ref().is_none_or(|m| &a.key.meter == m)).collect())
    }

    /// The dead letters of the export (windows refused for good, or never confirmed), in key
    /// order after `after`, at most `limit` of them.
    ///
    /// # Errors
    /// The store failed.
    pub async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, AdminError> {
        Ok(self.usage.dead_letters(after, limit).await?)
    }

    /// Puts a dead letter back in line for export, after its cause was fixed, as a new
    /// revision with a new identifier. Returns whether there was one.
    ///
    /// # Errors
    /// The store failed.
    pub async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, AdminError> {
        Ok(self.usage.requeue_dead_letter(key).await?)
    }

    /// Requeues every dead letter the billing system refused (reason `refused: …`), walking the
    /// list once; unconfirmed and unsettled ones, those without a status, those too old, and
    /// refusals that say the billing system holds an event under the identifier ("already
    /// exists", `idempotency_error`, as earlier versions parked them) are left for
    /// reconciliation. Returns (requeued, left).
    ///
    /// # Errors
    /// The store failed; what was requeued before stays requeued.
    pub async fn requeue_refused_dead_letters(&self) -> Result<(usize, usize), AdminError> {
        let (mut requeued, mut left) = (0, 0);
        let mut after = None;
        loop {
            let page = self.usage.dead_letters(after.as_ref(), 100).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for d in &page {
                // Refusals that say the billing system holds something under the identifier
                // (parked so by versions before namespaces) are left for reconciliation: a new
                // revision would bill them twice.
                let held = d.reason.contains("already exists") || d.reason.contains("idempotency");
                if d.reason.starts_with("refused:") && !held {
                    requeued += usize::from(self.usage.requeue_dead_letter(&d.key).await?);
                } else {
                    left += 1;
                }
            }
        }
        Ok((requeued, left))
    }

    /// Gives the store a new meter event identifier namespace (after restoring a backup, or
    /// copying a store for a second deployment), if nothing it exported under the current one
    /// is unsettled: refused while a dead letter may be held by the billing system under its
    /// current identifier (`unconfirmed`, `unsettled`, or failed without a status), since a
    /// new identifier would bill it twice. Run an export pass and a reconciliation
    /// ([`Tollgate::reconcile`](crate::Tollgate::reconcile) with `fix`) under the current
    /// namespace first, so that what the billing system already holds is marked exported
    /// (`tollgate export --new-namespace` does all three). Exports in flight keep the identifier
    /// they began with. Returns (the old namespace, the new one).
    ///
    /// # Errors
    /// Such dead letters remain ([`AdminError::Invalid`], naming the first), another process
    /// changed the namespace meanwhile, or the store failed.
    pub async fn new_identifier_namespace(&self) -> Result<(String, String), AdminError> {
        let mut after = None;
        let mut unsettled: Vec<DeadLetter> = Vec::new();
        let mut count = 0usize;
        loop {
            let page = self.usage.dead_letters(after.as_ref(), 100).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for d in page {
                let r = d.reason.as_str();
                if r.starts_with("unconfirmed") || r.starts_with("unsettled") || r.starts_with("failed ") {
                    count += 1;
                    if unsettled.is_empty() {
                        unsettled.push(d);
                    }
                }
            }
        }
        if let Some(first) = unsettled.first() {
            return Err(AdminError::Invalid(format!(
                "{count} dead letters may be held by the billing system under the current namespace (the first: \
                 {} {} {}): settle them first (tollgate reconcile --fix, or by hand with tollgate export \
                 --confirm or --requeue), or a new identifier would bill them twice",
                first.key.tenant, first.key.meter, first.key.window_start
            )));
        }
        let old = self.usage.identifier_namespace().await?;
        let new = crate::store::draw_namespace();
        if !self.usage.set_identifier_namespace(&old, &new).await? {
            return Err(AdminError::Invalid("the namespace changed meanwhile: run the command again".into()));
        }
        Ok((old, new))
    }

    /// Confirms a dead letter by hand: the billing system holds what it sent (checked there),
    /// so it is marked exported. Returns `false` when nothing was in flight for it (requeue it
    /// instead).
    ///
    /// # Errors
    /// No such dead letter or aggregate ([`AdminError::Invalid`]), or the store failed.
    pub async fn confirm_dead_letter(&self, key: &ExportKey) -> Result<bool, AdminError> {
        let Some(dead) = self.usage.dead_letter_of(key).await? else {
            return Err(AdminError::Invalid("no such dead letter".into()));
        };
        let Some(mut agg) = self.usage.aggregate(key).await? else {
            return Err(AdminError::Invalid("no such aggregate".into()));
        };
        agg.revision = dead.revision;
        Ok(self.usage.finish_export(&agg, unix_now()).await?)
    }
}

/// A Metronome customer id or ingest alias: not blank, at most 255 bytes, no control
/// characters (the configuration's rule for `metronome_customer`).
fn check_metronome_customer(m: &str) -> Result<&str, AdminError> {
    if m.trim() != m || m.is_empty() || m.len() > 255 || m.chars().any(char::is_control) {
        return Err(AdminError::Invalid(format!("`{m}` is not a Metronome customer id or ingest alias")));
    }
    Ok(m)
}

fn check_customer(c: &str) -> Result<&str, AdminError> {
    if c.is_empty() || c.len() > 255 || !c.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AdminError::Invalid(format!("`{c}` is not a billing customer id")));
    }
    Ok(c)
}

/// A new key: `tg_live_` (or `tg_test_`) and 32 random base-62 characters (190 bits).
fn new_key(test: bool) -> Result<String, AdminError> {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut key = String::from(if test { "tg_test_" } else { "tg_live_" });
    let mut n = 0;
    while n < 32 {
        let mut bytes = [0u8; 64];
        getrandom::fill(&mut bytes)
            .map_err(|e| AdminError::Invalid(format!("the system's random source failed: {e}")))?;
        // Rejection sampling: 248 = 4 × 62, so every character is equally likely.
        for b in bytes.into_iter().filter(|b| *b < 248) {
            if n == 32 {
                break;
            }
            key.push(char::from(ALPHABET[usize::from(b % 62)]));
            n += 1;
        }
    }
    Ok(key)
}

/// One line of an import, checked.
struct ImportRow {
    line: usize,
    tenant: TenantId,
    plan: Option<PlanId>,
    customer: Option<String>,
    key: Option<(KeyHash, String)>,
    expires_at: Option<i64>,
}

fn parse_import(text: &str, check_plan: impl Fn(&str) -> Result<(), AdminError>) -> Result<Vec<ImportRow>, AdminError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(AdminError::Import { line: 1, message: "empty: a header line is needed".to_owned() });
    };
    let names = split_csv(header).map_err(|m| AdminError::Import { line: 1, message: m })?;
    let known = ["tenant", "plan", "customer", "key", "key_sha256", "expires_at"];
    for n in &names {
        if !known.contains(&n.as_str()) {
            return Err(AdminError::Import {
                line: 1,
                message: format!("unknown column `{n}` (columns: {})", known.join(", ")),
            });
        }
    }
    let col = |name: &str| names.iter().position(|n| n == name);
    let Some(tenant_col) = col("tenant") else {
        return Err(AdminError::Import { line: 1, message: "a `tenant` column is needed".to_owned() });
    };
    let mut rows = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, text) in lines {
        let line = i + 1;
        let bad = |message: String| AdminError::Import { line, message };
        let fields = split_csv(text).map_err(bad)?;
        if fields.len() != names.len() {
            return Err(bad(format!("{} fields, the header has {}", fields.len(), names.len())));
        }
        let get = |name: &str| col(name).map(|c| fields[c].trim()).filter(|v| !v.is_empty());
        let tenant = fields[tenant_col].trim();
        if !TenantId::is_valid(tenant) {
            return Err(bad(format!("`{tenant}` is not a tenant id: 1 to 128 visible ASCII characters")));
        }
        let plan = match get("plan") {
            Some(p) => {
                check_plan(p).map_err(|e| bad(e.to_string()))?;
                Some(PlanId::from(p))
            }
            None => None,
        };
        let customer = get("customer")
            .map(|c| check_customer(c).map(str::to_owned))
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let key = match (get("key"), get("key_sha256")) {
            (Some(_), Some(_)) => return Err(bad("give `key` or `key_sha256`, not both".to_owned())),
            (Some(k), None) => {
                crate::tenant::check_api_key(k.as_bytes()).map_err(|why| bad(why.to_owned()))?;
                let prefix: String = k.chars().take(4).collect();
                Some((KeyHash::of(k.as_bytes()), prefix))
            }
            (None, Some(h)) => {
                let hash =
                    KeyHash::from_hex(h).ok_or_else(|| bad("`key_sha256` is not 64 hexadecimal digits".to_owned()))?;
                Some((hash, String::new()))
            }
            (None, None) => None,
        };
        if let Some((hash, _)) = &key {
            if let Some(first) = seen.insert(*hash, line) {
                return Err(bad(format!("the same key as line {first}")));
            }
        }
        let expires_at = match get("expires_at") {
            Some(v) => Some(v.parse::<i64>().map_err(|_| bad(format!("`{v}` is not a time in Unix seconds")))?),
            None => None,
        };
        rows.push(ImportRow { line, tenant: TenantId::from(tenant), plan, customer, key, expires_at });
    }
    Ok(rows)
}

/// Splits one CSV line (RFC 4180 quoting: `"a,b"`, `""` for a quote inside).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    let mut quoted = false;
    let mut started = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if started && field.is_empty() => quoted = true,
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => {
                quoted = false;
                started = false;
            }
            (false, ',') => {
                out.push(std::mem::take(&mut field));
                started = true;
            }
            (_, c) => field.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".to_owned());
    }
    out.push(field);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_split_with_quotes() {
        assert_eq!(split_csv("a,b,,c").unwrap(), ["a", "b", "", "c"]);
        assert_eq!(split_csv("\"a,b\",\"say \"\"hi\"\"\",c\r").unwrap(), ["a,b", "say \"hi\"", "c"]);
        assert!(split_csv("\"open").is_err());
    }

    #[test]
    fn keys_are_random_and_shaped() {
        let a = new_key(false).unwrap();
        let b = new_key(true).unwrap();
        assert!(a.starts_with("tg_live_") && a.len() == 40, "{a}");
        assert!(b.starts_with("tg_test_") && b.len() == 40, "{b}");
        assert_ne!(a[8..], b[8..]);
        assert!(a[8..].bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn an_import_names_its_bad_line_and_keeps_nothing() {
        let ok = |_: &str| Ok(());
        let e = parse_import("tenant,plan,key\nacme,free,k1\nbeta,free,k1\n", ok).err().unwrap();
        assert_eq!(e.to_string(), "line 3: the same key as line 2");
        let e = parse_import("tenant,plan,colour\n", ok).err().unwrap();
        assert!(e.to_string().starts_with("line 1: unknown column `colour`"), "{e}");
        let e = parse_import("tenant,key_sha256\nacme,abc\n", ok).err().unwrap();
        assert_eq!(e.to_string(), "line 2: `key_sha256` is not 64 hexadecimal digits");
        let e = parse_import("tenant,plan\nacme\n", ok).err().unwrap();
        assert_eq!(e.to_string(), "line 2: 1 fields, the header has 2");
        let rows = parse_import("plan,tenant,expires_at\n\nfree,acme,100\n", ok).unwrap();
        assert_eq!((rows[0].line, rows[0].expires_at, rows[0].key.is_none()), (3, Some(100), true));
    }
}
