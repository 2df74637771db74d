//! Tenants: added, their plans, billing customers and overrides set, listed, and the directory copied.

use crate::store::{KeyWrite, Setting};
use crate::{
    config::TenantId,
    store::{limited::Path, DirectoryStore, DirectoryStoreExt, StoreError, TenantRecord, TenantUpdate, UpdateWhen},
};

use super::{Admin, AdminError};

/// What a directory copy did ([`Admin::copy_directory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyReport {
    /// Tenants written to the other store (created, or replaced by the copied record).
    pub tenants: usize,
    /// API keys written (their hashes, ids, prefixes, creation and expiry times).
    pub keys: usize,
}

/// How many times `set_plan` reads the tenant again when its plan changed under it.
const SET_PLAN_ATTEMPTS: usize = 5;

/// A Metronome customer id or ingest alias: not blank, at most 255 bytes, no control
/// characters (the configuration's rule for `metronome_customer`).
fn check_metronome_customer(m: &str) -> Result<&str, AdminError> {
    if m.trim() != m || m.is_empty() || m.len() > 255 || m.chars().any(char::is_control) {
        return Err(AdminError::Invalid(format!("`{m}` is not a Metronome customer id or ingest alias")));
    }
    Ok(m)
}

pub(super) fn check_customer(c: &str) -> Result<&str, AdminError> {
    if c.is_empty() || c.len() > 255 || !c.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AdminError::Invalid(format!("`{c}` is not a billing customer id")));
    }
    Ok(c)
}

impl Admin {
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
        let mut loser = None;
        if let Some(c) = customer {
            let c = check_customer(c)?;
            if take {
                loser = self.holder(c, &record.id).await?;
            } else {
                self.refuse_held(c, &record.id).await?;
            }
            record = record.with_customer(c);
        }
        let written = self.directory.put_tenant(&record, &[]).await;
        // Its id may have been refused as unknown on this node (a tenant identified by id),
        // and the tenant a customer is taken from keeps none: both told, also after a store
        // error (the write may have been made).
        self.changed(&record.id).await;
        if let Some(loser) = &loser {
            self.changed(loser).await;
        }
        written?;
        if let (Some(loser), Some(c)) = (&loser, &record.customer) {
            self.record(loser, Setting::Customer, Some(c.clone()), None).await;
        }
        self.record(&record.id, Setting::Tenant, None, Some(tenant_text(&record))).await;
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
            let loser = match (customer, take) {
                (Some(c), false) => {
                    self.refuse_held(c, &record.id).await?;
                    None
                }
                (Some(c), true) => self.holder(c, &record.id).await?,
                (None, _) => None,
            };
            let update = TenantUpdate::Customer(record.id.clone(), customer.map(str::to_owned));
            let written = self.directory.update_tenant(&update, UpdateWhen::Unchanged(&record)).await;
            if !matches!(written, Ok(false)) {
                // Written, or maybe (a store error): the tenant, and the one the customer was
                // taken from, which keeps none, are told.
                self.changed(&record.id).await;
                if let Some(loser) = &loser {
                    self.changed(loser).await;
                }
            }
            if written? {
                if let (Some(loser), Some(c)) = (&loser, customer) {
                    self.record(loser, Setting::Customer, Some(c.to_owned()), None).await;
                }
                let before = std::mem::replace(&mut record.customer, customer.map(str::to_owned));
                self.record(&record.id, Setting::Customer, before, record.customer.clone()).await;
                return Ok(record);
            }
        }
        Err(AdminError::Store(StoreError::Conflict("the tenant's customer (it kept changing)")))
    }

    /// The tenant of the directory other than `tenant` that holds `customer`, which a `take`
    /// moves it from.
    async fn holder(&self, customer: &str, tenant: &TenantId) -> Result<Option<TenantId>, AdminError> {
        Ok(self.directory.tenant_by_customer(customer).await?.map(|t| t.id).filter(|t| t != tenant))
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
        match self.holder(customer, tenant).await? {
            Some(holder) => Err(AdminError::CustomerHeld { customer: customer.to_owned(), holder: holder.to_string() }),
            None => Ok(()),
        }
    }

    /// Moves a tenant to another plan: every running node sees it within a second (the directory's feed of tenants changed),
    /// within `limits.directory_ttl` if the feed could not be told. With tiers (`[tiers.NAME]`)
    /// it lifts a pin of the tenant's tier ([`set_tier`](Self::set_tier)): the operator's plan
    /// is the tenant's now, and its payments move it from there. A plan's name puts the tenant
    /// on its current version, `NAME@N` on version N
    /// ([plan versions](crate::guide::configuration#plan-versions)).
    ///
    /// # Errors
    /// No such tenant, an unknown plan, overrides of the tenant that do not fit it, or the
    /// store failed.
    pub async fn set_plan(&self, id: &str, plan: &str) -> Result<TenantRecord, AdminError> {
        let record = self.move_plan(id, plan).await?;
        if let (Some(config), Some(quota)) = (&self.config, &self.quota) {
            if !config.tiers().is_empty() {
                let now = self.clock.unix_secs();
                let read = crate::store::PaymentCall::Read { tenant: record.id.clone() };
                // The pin as it was, for the audit: a failed read never holds up the unpin.
                let pinned = quota.payments(&read, now).await.map(|answer| answer.pinned);
                let unpin = crate::store::PaymentCall::Pin { tenant: record.id.clone(), plan: None };
                quota.payments(&unpin, now).await?;
                let before = crate::settings::before_text(pinned, Clone::clone);
                self.record(&record.id, Setting::Tier, before, None).await;
            }
        }
        Ok(record)
    }

    /// Whether the tenant's overrides (of `record`) hold over `plan`.
    pub(super) fn overrides_fit(&self, record: &TenantRecord, plan: &crate::base::PlanId) -> Result<(), AdminError> {
        if let (Some(config), Some(json)) = (&self.config, &record.overrides) {
            let o =
                crate::config::PlanOverride::from_json(json, config).map_err(|e| AdminError::Invalid(e.to_string()))?;
            config
                .check_override(plan, &o)
                .map_err(|e| AdminError::Invalid(format!("the tenant's overrides do not fit plan `{plan}`: {e}")))?;
        }
        Ok(())
    }

    /// [`set_plan`](Self::set_plan) but for the pin.
    async fn move_plan(&self, id: &str, plan: &str) -> Result<TenantRecord, AdminError> {
        self.move_to(id, self.plan(plan)?).await
    }

    /// [`move_plan`](Self::move_plan) to a plan already resolved (a version named stays that
    /// version: `pro` is version 1 here, not the current one).
    async fn move_to(&self, id: &str, plan: crate::base::PlanId) -> Result<TenantRecord, AdminError> {
        // Written only over what was read: a webhook applied meanwhile is read again (its plan
        // replaced, its event time kept, so an older event delivered late stays stale).
        for _ in 0..SET_PLAN_ATTEMPTS {
            let mut record = self.existing(id).await?;
            // The tenant's overrides must hold over the new plan too.
            self.overrides_fit(&record, &plan)?;
            let update = TenantUpdate::Plan(record.id.clone(), plan.clone());
            if self.directory.update_tenant(&update, UpdateWhen::Unchanged(&record)).await? {
                let before = std::mem::replace(&mut record.plan, plan);
                self.changed(&record.id).await;
                self.record(&record.id, Setting::Plan, Some(before.to_string()), Some(record.plan.to_string())).await;
                return Ok(record);
            }
        }
        Err(AdminError::Store(StoreError::Conflict("the tenant's plan (webhooks kept changing it)")))
    }

    /// Pins a tenant's tier (`[tiers.NAME]`) to `plan`, a plan of its ladder (or of any ladder,
    /// for a tenant on none): the tenant moves there (as [`set_plan`](Self::set_plan) moves
    /// it), and no payment, refund or daily check moves it until the pin is lifted. `None`
    /// lifts it and leaves the plan as it is: from there payments move the tenant up, and down
    /// only on a refund or dispute on a ladder that moves down; to end a trial of a higher
    /// tier, [`set_plan`](Self::set_plan) moves it (and lifts the pin). The pin is kept with
    /// what the tenant has paid, in the quota store, so every node's moves see it.
    ///
    /// # Errors
    /// No such tenant, an unknown plan or one of another ladder than the tenant's, overrides
    /// of the tenant that do not fit it, no configuration (what says the ladders) or quota
    /// store given: checked before anything is written. Then the store's failure, after which
    /// the pin is given back as it was (said in the error when that failed too).
    pub async fn set_tier(&self, id: &str, plan: Option<&str>) -> Result<TenantRecord, AdminError> {
        use crate::store::PaymentCall;
        let tenant = Self::tenant_id(id)?;
        let quota = self.quota.as_ref().ok_or_else(|| {
            AdminError::Invalid("a tier is pinned in the quota store: none is given (Admin::with_quota)".into())
        })?;
        let Some(config) = &self.config else {
            return Err(AdminError::Invalid(
                "tiers are the configuration's ([tiers.NAME]): none is given (Admin::with_config)".into(),
            ));
        };
        let plan = plan.map(|p| self.plan(p)).transpose()?;
        let record = self.existing(id).await?;
        let now = self.clock.unix_secs();
        let pin = |plan: Option<String>| PaymentCall::Pin { tenant: tenant.clone(), plan };
        let pinned = || async { quota.payments(&PaymentCall::Read { tenant: tenant.clone() }, now).await };
        let Some(plan) = plan else {
            let before = pinned().await?.pinned;
            quota.payments(&pin(None), now).await?;
            self.record(&tenant, Setting::Tier, before, None).await;
            return Ok(record);
        };
        let Some(ladder) = config.tier_of(&plan) else {
            return Err(AdminError::Invalid(format!(
                "plan `{plan}` is on no ladder ([tiers.NAME]): `tollgate tenants set-plan` moves a tenant to it"
            )));
        };
        if let Some(own) = config.tier_of(&record.plan).filter(|own| own.name() != ladder.name()) {
            return Err(AdminError::Invalid(format!(
                "plan `{plan}` is on the ladder `{}`, the tenant's plan `{}` on `{}`: a tier is pinned on the \
                 tenant's own ladder (`tollgate tenants set-plan` moves it to another)",
                ladder.name(),
                record.plan,
                own.name()
            )));
        }
        self.overrides_fit(&record, &plan)?;
        // Pinned first, so that no payment moves it between the move and the pin; given back
        // as it was if either fails.
        let before = pinned().await?.pinned;
        let moved = match quota.payments(&pin(Some(plan.as_str().to_owned())), now).await {
            Ok(_) => self.move_to(id, plan.clone()).await,
            Err(e) => Err(e.into()),
        };
        match moved {
            Ok(record) => {
                self.record(&tenant, Setting::Tier, before, Some(plan.to_string())).await;
                Ok(record)
            }
            Err(e) => match quota.payments(&pin(before), now).await {
                Ok(_) => Err(e),
                Err(again) => Err(AdminError::Invalid(format!(
                    "{e}; and the tier's pin could not be given back ({again}): `tollgate tenants set-tier {id} \
                     --unpin` lifts it"
                ))),
            },
        }
    }

    /// A tenant's tier (`[tiers.NAME]`): what it has paid and what unlocks the next plan of its
    /// ladder, as the tenant's usage route shows it. `None` when it is no tenant of the
    /// directory (a tenant of the file is on no ladder), its plan is on no ladder, or no
    /// configuration or quota store is given.
    ///
    /// # Errors
    /// A bad tenant id, or the store failed.
    pub async fn tier(&self, id: &str) -> Result<Option<crate::report::TierView>, AdminError> {
        let Some(record) = self.directory.tenant(&Self::tenant_id(id)?).await? else { return Ok(None) };
        let (Some(config), Some(quota)) = (&self.config, &self.quota) else { return Ok(None) };
        let Some(ladder) = config.tier_of(&record.plan) else { return Ok(None) };
        let now = self.clock.unix_secs();
        let answer = quota.payments(&crate::store::PaymentCall::Read { tenant: record.id.clone() }, now).await?;
        Ok(Some(crate::report::TierView::of(ladder, &record.plan, &answer, config, now)))
    }

    /// A tenant of the directory past due within its grace (`[stripe] past_due_grace`): when
    /// the grace ends and the plan it moves to then, as its usage route and its responses'
    /// `Tollgate-Past-Due` header tell it. `None` when it is not (or no configuration is given).
    ///
    /// # Errors
    /// A bad tenant id, or the store failed.
    pub async fn past_due(&self, id: &str) -> Result<Option<crate::store::PastDue>, AdminError> {
        let Some(record) = self.directory.tenant(&Self::tenant_id(id)?).await? else { return Ok(None) };
        let Some(config) = &self.config else { return Ok(None) };
        Ok(crate::billing::past_due(config, record.subscriptions.as_deref()))
    }

    /// Sets a tenant's overrides of its plan (their JSON form, the keys of
    /// `[tenants.X.overrides]`: `rate`, `burst`, `quotas`, `features`), checked against the
    /// configuration; `None` removes them. Only the overrides change (a plan change made at
    /// the same moment is kept), and they are written only over the plan they were checked
    /// against: a plan changed meanwhile is read and checked again. Running nodes see it
    /// within a second (the directory's feed of tenants changed).
    ///
    /// # Errors
    /// No such tenant, overrides that are not valid for the configuration (or no
    /// configuration to check them against), or the store failed.
    pub async fn set_overrides(&self, id: &str, overrides: Option<&str>) -> Result<TenantRecord, AdminError> {
        let tenant = Self::tenant_id(id)?;
        let Some(text) = overrides else {
            // Removing them fits any plan.
            let before = self.existing(id).await?.overrides;
            if !self.directory.update_tenant(&TenantUpdate::Overrides(tenant.clone(), None), UpdateWhen::Always).await?
            {
                return Err(AdminError::UnknownTenant(id.to_owned()));
            }
            self.changed(&tenant).await;
            self.record(&tenant, Setting::Overrides, before, None).await;
            return self.existing(id).await;
        };
        let Some(config) = &self.config else {
            return Err(AdminError::Invalid("overrides are checked against a configuration: none is given".into()));
        };
        let o = crate::config::PlanOverride::from_json(text, config).map_err(|e| AdminError::Invalid(e.to_string()))?;
        let json = (!o.is_empty()).then(|| o.to_json());
        for _ in 0..SET_PLAN_ATTEMPTS {
            let mut record = self.existing(id).await?;
            config.check_override(&record.plan, &o).map_err(AdminError::Invalid)?;
            // Written only over the tenant as checked: a plan changed meanwhile (by hand or by
            // a webhook) is read again and checked again.
            let update = TenantUpdate::Overrides(tenant.clone(), json.clone());
            if self.directory.update_tenant(&update, UpdateWhen::Unchanged(&record)).await? {
                let before = std::mem::replace(&mut record.overrides, json);
                self.changed(&tenant).await;
                self.record(&tenant, Setting::Overrides, before, record.overrides.clone()).await;
                return Ok(record);
            }
        }
        Err(AdminError::Store(StoreError::Conflict("the tenant (it kept changing)")))
    }

    /// Sets (or, with `None`, removes) a tenant's Metronome customer id or ingest alias: what
    /// its usage events carry with `export.sink = "metronome"`. Nothing else of the tenant
    /// changes. Its windows waiting for export are billed to the new customer (exports in
    /// flight keep the customer they began with). Running nodes see it within a second (the
    /// directory's feed of tenants changed).
    ///
    /// # Errors
    /// No such tenant, a customer that is empty, longer than 255 bytes or holds control
    /// characters, or the store failed.
    pub async fn set_metronome_customer(&self, id: &str, customer: Option<&str>) -> Result<TenantRecord, AdminError> {
        let tenant = Self::tenant_id(id)?;
        let customer = customer.map(check_metronome_customer).transpose()?;
        let before = self.existing(id).await?.metronome_customer;
        let update = TenantUpdate::MetronomeCustomer(tenant.clone(), customer.map(str::to_owned));
        if !self.directory.update_tenant(&update, UpdateWhen::Always).await? {
            return Err(AdminError::UnknownTenant(id.to_owned()));
        }
        self.changed(&tenant).await;
        self.record(&tenant, Setting::MetronomeCustomer, before, customer.map(str::to_owned)).await;
        self.existing(id).await
    }

    /// The tenant `id` as the directory holds it (`None`: no such tenant), read within the
    /// background time limit as every call of `Admin` is.
    ///
    /// # Errors
    /// An id that is not one, or the store failed.
    pub async fn tenant(&self, id: &str) -> Result<Option<TenantRecord>, AdminError> {
        Ok(self.directory.tenant(&Self::tenant_id(id)?).await?)
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
    /// id, prefix, creation, expiry and scopes). For a team moving from one store to another (a SQLite
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
                    self.calls.call(Path::Background, "put key", to.put_key(&key, KeyWrite::Upsert)).await?;
                    report.keys += 1;
                }
            }
        }
    }
}

/// A tenant as its audit records its creation: `plan=PLAN customer=… metronome=…`.
pub(super) fn tenant_text(record: &TenantRecord) -> String {
    let mut text = format!("plan={}", record.plan);
    if let Some(c) = &record.customer {
        text.push_str(&format!(" customer={c}"));
    }
    if let Some(m) = &record.metronome_customer {
        text.push_str(&format!(" metronome={m}"));
    }
    text
}
