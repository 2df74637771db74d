//! The fleet's requests admitted and refused, and money spent, as every node's tallies add up
//! in the usage store.

use crate::store::{Tally, TallyQuery, TallyRead};

use super::{Admin, AdminError};

impl Admin {
    /// The tallies `query` names ([`UsageStore::tallies`](crate::store::UsageStore::tallies)):
    /// the fleet's minutes, every tenant's days, or one tenant's, in (start, tenant) order,
    /// at most `query.max` (never more than
    /// [`TALLY_READ_MAX`](crate::store::contract::TALLY_READ_MAX)), none older than
    /// [`TALLY_KEPT_SECS`](crate::store::contract::TALLY_KEPT_SECS). What a node counted is
    /// there once its flush stored it (`usage.flush_interval`).
    ///
    /// # Errors
    /// The store failed.
    pub async fn tallies(&self, query: &TallyQuery) -> Result<Vec<Tally>, AdminError> {
        // Through the role's limits: a call within the background time limit, counted.
        Ok(self.usage.tallies(query).await?)
    }

    /// `tenant`'s tally of the UTC day that holds `at` (Unix seconds), if it has one.
    ///
    /// # Errors
    /// A bad tenant id, or the store failed.
    pub async fn tenant_tally(&self, tenant: &str, at: i64) -> Result<Option<Tally>, AdminError> {
        let day = at - at.rem_euclid(86_400);
        let query = TallyQuery::new(TallyRead::Tenant(Self::tenant_id(tenant)?), day, day + 86_400).with_max(1);
        Ok(self.tallies(&query).await?.pop())
    }
}
