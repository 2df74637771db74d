//! The directory followed: the store's feed of tenants changed (`store/changes.rs`) read once
//! a second, and the tenants this node holds whose entry moved read again at once, so that a
//! plan change, a revoked key or new overrides written anywhere (`Admin`, the CLI, a webhook
//! on another node) is served by every node within a second, not within
//! `limits.directory_ttl`.

use super::gate::Gate;
use crate::config::TenantId;
use crate::store::{ChangeCall, StoreError};

impl Gate {
    /// Reads the directory's feed of tenants changed and reads again, at once, every tenant
    /// this node holds that changed since the last read (stamped above the head it last saw):
    /// their revalidation, where a changed plan or customer gets a new state and a credential
    /// the store no longer has stops working. At the first read, the tenants held whose entry
    /// was told since the engine started (less the clock-skew bound) are read again, and every
    /// tenant held when the feed ever dropped an entry; later, every tenant held is read again
    /// when the feed dropped, to stay bounded, a change this node never saw (its floor above
    /// the head last seen), or was started anew (its head below it). Returns how many tenants
    /// it marked to be read again.
    pub(crate) async fn follow_directory(&self) -> Result<usize, StoreError> {
        // A node that never read a tenant from the directory holds nothing a change could
        // touch: no store read (a tenant it reads later is read as it is then).
        if !self.follow.looked_up.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(0);
        }
        let mut last = self.follow.last.lock().await;
        let feed = self.shared.stores().background().directory.changes(ChangeCall::Read).await?;
        let (changed, all): (Vec<&TenantId>, bool) = match last.head {
            // The first read: the tenants told since the engine started; all of them when the
            // feed dropped changes (it may have dropped one told since the start).
            None => {
                let skew = i64::try_from(self.shared.runtime().load().config.limits.clock_skew().as_millis())
                    .unwrap_or(i64::MAX);
                let since = self.follow.started.saturating_sub(skew);
                (feed.tenants.iter().filter(|c| c.at >= since).map(|c| &c.tenant).collect(), feed.floor > 0)
            }
            // A floor above the head last seen dropped a change never seen; a head below it is
            // a feed started anew (emptied, restored): either way, everything is read again.
            Some(head) => (
                feed.tenants.iter().filter(|c| c.stamp > head).map(|c| &c.tenant).collect(),
                feed.floor > head || feed.head() < head,
            ),
        };
        // Marked before they are read again: a lookup or a revalidation that read a tenant
        // before this mark neither attaches nor confirms what it read.
        let marked = if all {
            self.table.mark_all_changed();
            self.table.unconfirm(None)
        } else {
            changed
                .iter()
                .map(|t| {
                    self.table.tenant_changed(t);
                    self.table.unconfirm(Some(t))
                })
                .sum()
        };
        last.head = Some(feed.head());
        if marked > 0 || last.pending {
            tracing::debug!(tenants = marked, all, "tenants changed in the directory are read again");
            self.revalidate().await;
            last.pending = self.table.unconfirmed() > 0;
        }
        Ok(marked)
    }
}
