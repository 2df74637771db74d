//! The places role of the PostgresStore: a tenant's places read under a row lock and written
//! in one transaction, on the server's clock: every node's places expire by one clock, however
//! skewed the nodes' own.

use super::*;
use crate::store::{PlaceCall, PlaceMode, PlaceRow, PlaceStore, Places};

#[async_trait]
impl PlaceStore for PostgresStore {
    async fn places(&self, call: &PlaceCall, mode: PlaceMode) -> Result<Places, StoreError> {
        let insert = self
            .sql("INSERT INTO {s}.place_leases (tenant, holders, expires) VALUES ($1, '', 0) ON CONFLICT DO NOTHING");
        let read = self.sql(
            "SELECT holders, (extract(epoch FROM clock_timestamp()) * 1000000000)::int8 \
             FROM {s}.place_leases WHERE tenant = $1 FOR UPDATE",
        );
        let write = self.sql("UPDATE {s}.place_leases SET holders = $2, expires = $3 WHERE tenant = $1");
        let tenant = call.tenant.as_str();
        // The row is kept when no node holds a place (the hourly prune deletes it once it has
        // been empty a while): a call racing the deletion would find no row to lock.
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin_contended(&mut client).await?;
            tx.query_typed(&insert, args![tenant]).await?;
            let Some(found) = tx.query_typed_opt(&read, args![tenant]).await? else {
                // Deleted by the prune between the insert and the lock: a race lost.
                return Err(Fail::Store(StoreError::Conflict("a places row deleted under the call")));
            };
            let mut row = PlaceRow::from_json(found.get::<_, &str>(0)).map_err(Fail::Store)?;
            // The server's time once the row is locked: no call applied before this one carries
            // a later time.
            let call = call.clone().at(found.get::<_, i64>(1));
            let before = row.clone();
            let out = row.apply(&call, mode);
            if row != before {
                // An emptied row keeps the time of its last call: the prune deletes it a day
                // later, never while its tenant's nodes come and go.
                tx.query_typed(&write, args![tenant, row.to_json(), row.expires().max(call.now)]).await?;
            }
            tx.commit().await?;
            Ok(out)
        })
        .await
    }
}
