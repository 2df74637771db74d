//! The audit of tenants' settings read: who changed what, from what to what, when.

use crate::store::{AuditCursor, AuditQuery, AuditRecord, AuditStore};

use super::{Admin, AdminError};

/// The most records one [`Admin::audit`] call reads.
pub const AUDIT_PAGE_MAX: usize = 500;

impl Admin {
    /// The audit's records, newest first: `tenant`'s (by their number), or with `None` every
    /// tenant's (by time), after `before` (the last record of the page before), at most
    /// `limit` (1 to [`AUDIT_PAGE_MAX`]), none older than
    /// [`AUDIT_KEPT_SECS`](crate::store::AUDIT_KEPT_SECS).
    ///
    /// # Errors
    /// A bad tenant id, no audit store ([`with_audit`](Self::with_audit)), or the store failed.
    pub async fn audit(
        &self,
        tenant: Option<&str>,
        before: Option<AuditCursor>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, AdminError> {
        let audit = self.audit_store()?;
        let now = self.clock.unix_nanos() / 1_000_000;
        let mut query = AuditQuery::new(now, limit.clamp(1, AUDIT_PAGE_MAX));
        if let Some(t) = tenant {
            query = query.tenant(Self::tenant_id(t)?);
        }
        if let Some(c) = before {
            query = query.before(c);
        }
        Ok(audit.list_audit(&query).await?)
    }

    fn audit_store(&self) -> Result<&std::sync::Arc<dyn AuditStore>, AdminError> {
        self.audit.as_ref().ok_or_else(|| {
            AdminError::Invalid("the audit is kept in the directory's store: none is given (Admin::with_audit)".into())
        })
    }
}
