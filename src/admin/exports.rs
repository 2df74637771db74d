//! The usage a tenant was billed, and the dead letters of the export.

use crate::store::{unix_now, DeadLetter, ExportKey, ExportStoreExt, UsageAggregate, UsageStoreExt};

use super::{Admin, AdminError};

impl Admin {
    /// The usage of a tenant in the windows starting in `[from, to)` (Unix seconds), of one
    /// meter or all, with what was exported of it. A meter with dimensions (`tokens`) gives its
    /// series (`tokens{model=m-large,kind=output}`), where its usage is recorded; a selector
    /// (`tokens{model=m-large}`) gives the series it matches.
    ///
    /// # Errors
    /// The store failed; [`AdminError::Invalid`] for a malformed selector.
    pub async fn usage(
        &self,
        tenant: &str,
        meter: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<UsageAggregate>, AdminError> {
        let tenant = Self::tenant_id(tenant)?;
        let all = self.usage.usage_range(&tenant, from, to).await?;
        let Some(meter) = meter else { return Ok(all) };
        let (family, pairs) = match crate::config::parse_selector(meter) {
            None => (meter, Vec::new()),
            Some(Ok(selector)) => selector,
            Some(Err(why)) => return Err(AdminError::Invalid(format!("`{meter}`: {why}"))),
        };
        Ok(all
            .into_iter()
            .filter(|a| {
                let id = a.key.meter.as_str();
                id == meter
                    || match crate::config::parse_selector(id) {
                        Some(Ok((of, values))) => of == family && pairs.iter().all(|p| values.contains(p)),
                        _ => false,
                    }
            })
            .collect())
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
