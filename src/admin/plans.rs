//! Plan versions: moving the tenants of one version of a plan to another (`tollgate plans
//! migrate`), a batch at a time.

use super::{Admin, AdminError};
use crate::base::{PlanId, TenantId};
use crate::store::{TenantUpdate, UpdateWhen};

/// The most tenants one batch of [`Admin::migrate_plan`] reads.
pub const MAX_MIGRATE_BATCH: usize = 1_000;

/// The most tenants [`Admin::plan_versions`] reads (in pages of [`MAX_MIGRATE_BATCH`]).
pub const VERSION_SCAN_TENANTS: usize = 100_000;

/// How many tenants are on each version of each plan ([`Admin::plan_versions`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanVersions {
    /// Per plan's name, per version: the tenants of the directory on it (a version the file
    /// no longer declares is counted too: its tenants are served the current one).
    pub counts: std::collections::BTreeMap<String, std::collections::BTreeMap<u32, u64>>,
    /// Tenants read.
    pub read: usize,
    /// Whether the directory was read to its end; `false`: it holds more than
    /// [`VERSION_SCAN_TENANTS`] tenants and the counts are of the first ones (by id).
    pub complete: bool,
}

/// One batch of [`Admin::migrate_plan`]: the tenants it read, those on the version migrated
/// from, and where the next batch starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrateBatch {
    /// Tenants read (of every plan).
    pub read: usize,
    /// Tenants on the version migrated from that fit the version migrated to: moved, or, in a
    /// dry run, that would be.
    pub moved: Vec<TenantId>,
    /// Tenants on the version migrated from kept there, with why: their overrides do not fit
    /// the version migrated to (mend them, or set their plan by hand), or their plan changed
    /// while the batch moved them.
    pub kept: Vec<(TenantId, String)>,
    /// The last tenant read, where the next batch starts (`after`); `None`: the directory is
    /// read to its end.
    pub next: Option<TenantId>,
}

impl Admin {
    /// Moves the tenants of version `from` of the plan `plan` to its version `to`, a batch of
    /// `batch` tenants of the directory (1 to [`MAX_MIGRATE_BATCH`]) at a time, starting after
    /// the tenant `after` (`None`: the first). With `apply` false (a dry run) nothing is
    /// written: the batch says whom it would move and whom it would keep.
    ///
    /// Each tenant moves in a write of its own, only if it is still as read (a webhook or an
    /// operator that moved it meanwhile wins), and is told to every node as
    /// [`set_plan`](Self::set_plan) tells it: the period's usage, holds, leases and spend
    /// carry over as they do across any plan change. A migration stopped midway (a crash, a
    /// SIGKILL) is resumed by running it again, from the start or from the last batch's
    /// `next`: the tenants moved are on `to` and no longer match, so none moves twice.
    ///
    /// A tenant whose overrides do not fit version `to` is kept on `from` and named in
    /// [`MigrateBatch::kept`].
    ///
    /// # Errors
    /// Without a configuration, or for a plan it does not declare, `from` equal to `to`, a
    /// version `to` the file does not declare (`version`, `[plans.NAME.versions.N]`), or a
    /// batch out of bounds: nothing read or written. Then the store's failure: the tenants
    /// moved before it stay moved.
    pub async fn migrate_plan(
        &self,
        plan: &str,
        from: u32,
        to: u32,
        after: Option<&str>,
        batch: usize,
        apply: bool,
    ) -> Result<MigrateBatch, AdminError> {
        let config = self.config.as_ref().ok_or_else(|| {
            AdminError::Invalid("a migration reads the plan's versions in the configuration: none is given".into())
        })?;
        let Some(current) = config.put_on(plan).filter(|p| p.is_current() && p.id().name() == plan) else {
            return Err(AdminError::UnknownPlan(plan.to_owned()));
        };
        if from == 0 || to == 0 {
            return Err(AdminError::Invalid(
                "version 0 is no version: a plan's versions count from 1 (its bare name is version 1)".into(),
            ));
        }
        if from == to {
            return Err(AdminError::Invalid(format!("--from and --to are both version {from}: nothing to move")));
        }
        let (from_id, to_id) = (PlanId::at_version(plan, from), PlanId::at_version(plan, to));
        if config.plans().get(&to_id).is_none() {
            return Err(AdminError::Invalid(format!(
                "plan `{plan}` has no version {to}: its current version is {}{}",
                current.version(),
                declared(config, plan)
            )));
        }
        if !(1..=MAX_MIGRATE_BATCH).contains(&batch) {
            return Err(AdminError::Invalid(format!("a batch is 1 to {MAX_MIGRATE_BATCH} tenants, not {batch}")));
        }
        let after = after.map(Self::tenant_id).transpose()?;
        let page = self.directory.list_tenants(after.as_ref(), batch).await?;
        let mut out = MigrateBatch {
            read: page.len(),
            next: (page.len() == batch).then(|| page.last().map(|r| r.id.clone())).flatten(),
            ..MigrateBatch::default()
        };
        for read in page.into_iter().filter(|r| r.plan == from_id) {
            if let Err(why) = self.overrides_fit(&read, &to_id) {
                out.kept.push((read.id, why.to_string()));
                continue;
            }
            if !apply {
                out.moved.push(read.id);
                continue;
            }
            let update = TenantUpdate::Plan(read.id.clone(), to_id.clone());
            if self.directory.update_tenant(&update, UpdateWhen::Unchanged(&read)).await? {
                self.changed(&read.id).await;
                let (before, after) = (Some(read.plan.to_string()), Some(to_id.to_string()));
                self.record(&read.id, crate::store::Setting::Plan, before, after).await;
                out.moved.push(read.id);
            } else {
                out.kept.push((read.id, "changed while it moved (its plan, overrides or billing): run again".into()));
            }
        }
        Ok(out)
    }
}

impl Admin {
    /// How many tenants of the directory are on each version of each plan: a read of up to
    /// `max` tenants (at most [`VERSION_SCAN_TENANTS`]), a thousand at a time.
    ///
    /// # Errors
    /// The store's failure.
    pub async fn plan_versions(&self, max: usize) -> Result<PlanVersions, AdminError> {
        let max = max.min(VERSION_SCAN_TENANTS);
        let mut out = PlanVersions::default();
        let mut after: Option<TenantId> = None;
        loop {
            let want = MAX_MIGRATE_BATCH.min(max - out.read);
            if want == 0 {
                return Ok(out);
            }
            let page = self.directory.list_tenants(after.as_ref(), want).await?;
            out.read += page.len();
            for r in &page {
                *out.counts.entry(r.plan.name().to_owned()).or_default().entry(r.plan.version()).or_default() += 1;
            }
            if page.len() < want {
                out.complete = true;
                return Ok(out);
            }
            after = page.last().map(|r| r.id.clone());
        }
    }
}

/// The versions of `plan` the configuration declares, said after an unknown one.
fn declared(config: &crate::config::Config, plan: &str) -> String {
    let versions: Vec<String> =
        config.plans().values().filter(|p| p.id().name() == plan).map(|p| p.version().to_string()).collect();
    format!(" (declared: {})", versions.join(", "))
}
