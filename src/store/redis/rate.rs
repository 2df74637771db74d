//! The rate role of the RedisStore: a tenant's shared bucket as one hash, read and written
//! back under a compare-and-set of its version (read again when another node wrote it), on the
//! server's clock: every node's call is applied at the server's time as the row was read, so
//! that nodes whose clocks disagree share one bucket by one clock (the answer's TAT is given
//! back on the caller's clock).

use async_trait::async_trait;

use super::{kept_for, secs_of, RedisStore, Ttl};
use crate::{
    base::TenantId,
    store::{
        race::{until_won, Race, Retries, ATTEMPTS},
        CellCall, CellGrant, CellReturn, RateRow, RateStore, StoreError,
    },
};

const NANOS: i64 = 1_000_000_000;

impl RedisStore {
    /// Runs `apply` on `tenant`'s bucket for a call made at `now` (Unix nanoseconds, the
    /// caller's clock), with how far the server's clock is ahead of it as the row was read,
    /// and writes it back if no other call wrote it meanwhile (else reads it again); with
    /// `create`, a missing bucket starts empty, else `None`. A write from a read lands only if
    /// no other came between, so no call applied before it carries a later time.
    async fn with_rate_row<T: Send>(
        &self,
        tenant: &TenantId,
        now: i64,
        create: bool,
        apply: impl Fn(&mut RateRow, i64) -> T + Sync,
    ) -> Result<Option<T>, StoreError> {
        let key = &self.keys().rate(tenant);
        let apply = &apply;
        // Twice a counter's tries: every node of a busy tenant writes this one row.
        let what = "a tenant's shared rate, written by other nodes all along";
        until_won(what, Retries::BACKING_OFF.attempts(2 * ATTEMPTS), (), |(), _| {
            Box::pin(async move {
                let (found, ahead) = self.row_at(key, now).await?;
                let now = now.saturating_add(ahead);
                let mut row = match found.exists() {
                    true => RateRow::from_stored(found.int("tat")?.unwrap_or(0), found.text("senders").unwrap_or(""))?,
                    false if create => RateRow::default(),
                    false => return Ok(Race::Won(None)),
                };
                let before = row.clone();
                let out = apply(&mut row, ahead);
                if row == before && found.exists() {
                    // Answered again, or refused: nothing to write.
                    return Ok(Race::Won(Some(out)));
                }
                // Gone a day after its bucket is full again.
                let ttl = kept_for(now / NANOS, row.tat / NANOS + 86_400);
                let (tat, senders) = (row.tat.to_string(), row.senders_json());
                let fields: [(&str, &[u8]); 2] = [("tat", tat.as_bytes()), ("senders", senders.as_bytes())];
                match self.put(key, &found.version(), Ttl::For(ttl), &fields).await? {
                    true => Ok(Race::Won(Some(out))),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }
}

#[async_trait]
impl RateStore for RedisStore {
    async fn take_cells(&self, call: &CellCall) -> Result<CellGrant, StoreError> {
        let grant = self
            .with_rate_row(&call.tenant, call.now, true, |row, ahead| {
                let mut on_server = call.clone();
                on_server.now = call.now.saturating_add(ahead);
                on_server.token = call.token.at(call.token.at.saturating_add(secs_of(ahead)));
                let grant = row.take(&on_server);
                // The bucket's time on the caller's clock, which its node reads it by.
                CellGrant::new(grant.granted, grant.tat.saturating_sub(ahead))
            })
            .await?;
        grant.ok_or(StoreError::Conflict("a tenant's shared rate vanished while it was written"))
    }

    async fn return_cells(&self, call: &CellReturn) -> Result<(), StoreError> {
        self.with_rate_row(&call.tenant, call.now, false, |row, ahead| {
            // The lease's end as its node knows it (on its clock), moved with the call.
            let mut on_server = call.clone();
            on_server.now = call.now.saturating_add(ahead);
            on_server.lease_end = call.lease_end.saturating_add(ahead);
            on_server.token = call.token.at(call.token.at.saturating_add(secs_of(ahead)));
            row.give_back(&on_server);
        })
        .await
        .map(drop)
    }
}
