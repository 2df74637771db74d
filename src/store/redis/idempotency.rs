//! The idempotency role of the RedisStore: a binding as one hash, claimed, renewed and settled
//! under a compare-and-set of its version; the bytes of stored responses counted per window
//! bucket in shards (as the DynamoStore does), so that no one row takes the fleet's writes.
//! A binding's times (in flight until, expires) are kept on the server's clock: a claim is
//! judged at the server's time as the row was read, so that a node whose clock runs ahead
//! never takes over a key another node's request still runs under.

use async_trait::async_trait;

use super::{kept_for, secs_of, RedisStore, Row, Ttl};
use crate::store::{
    race::{until_won, Race, Retries},
    IdempotencyClaim, IdempotencySettle, IdempotencySettled, IdempotencyState, IdempotencyStore, StoreError,
    StoredResponse,
};

/// The counters of stored responses' bytes per bucket: a response is counted in one of these
/// (drawn by its owner), each holding its share of the bucket's bytes.
const BYTE_SHARDS: u64 = 16;

const NANOS: i64 = 1_000_000_000;

/// A binding as read: live at `now` (not expired, nor left in flight past its time), or `None`.
fn live(row: &Row, now: i64) -> Result<Option<Binding>, StoreError> {
    if !row.exists() {
        return Ok(None);
    }
    let completed = row.text("completed") == Some("1");
    let expires = row.int("expires")?.unwrap_or(i64::MAX);
    let until = row.int("until")?.unwrap_or(i64::MAX);
    if now >= expires || (!completed && now >= until) {
        return Ok(None);
    }
    Ok(Some(Binding { request: row.text("request").unwrap_or_default().to_owned(), completed }))
}

/// A live binding.
struct Binding {
    request: String,
    completed: bool,
}

/// The state a live binding gives a claim or a read of `request`.
fn state_of(row: &Row, binding: &Binding, request: &str) -> Result<IdempotencyState, StoreError> {
    if binding.request != request {
        return Ok(IdempotencyState::Mismatch);
    }
    if !binding.completed {
        return Ok(IdempotencyState::InFlight);
    }
    let response = row.bytes("response").map(StoredResponse::decode).transpose()?;
    Ok(IdempotencyState::Completed(response.map(Box::new)))
}

impl RedisStore {
    /// Changes the binding of `key` that `owner` holds unsettled (`change`: its fields anew;
    /// `None`: released), under a compare-and-set of what was read.
    async fn settle_held(
        &self,
        key: &str,
        owner: u64,
        change: impl Fn(&Row) -> Option<Vec<(&'static str, Vec<u8>)>> + Sync,
    ) -> Result<IdempotencySettled, StoreError> {
        let at = &self.keys().idempotency(key);
        let change = &change;
        let what = "an Idempotency-Key binding, written by another node all along";
        until_won(what, Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let row = self.row(at).await?;
                let held = row.exists()
                    && row.text("owner") == Some(owner.to_string().as_str())
                    && row.text("completed") != Some("1");
                if !held {
                    return Ok(Race::Won(IdempotencySettled::NotHeld));
                }
                let fields = change(&row);
                let owned: Vec<(&str, &[u8])> =
                    fields.iter().flatten().map(|(name, value)| (*name, value.as_slice())).collect();
                // Kept as the claim set it: until the binding's expiry.
                match self.put(at, &row.version(), Ttl::AsItWas, &owned).await? {
                    true => Ok(Race::Won(IdempotencySettled::Settled)),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }

    /// Counts `size` bytes in the shard of `owner` of the bucket of `done`, if they fit its
    /// share: whether they did.
    async fn count_bytes(
        &self,
        done: &crate::store::CompletedRequest,
        owner: u64,
        size: u64,
    ) -> Result<bool, StoreError> {
        let share = done.bucket_bytes() / BYTE_SHARDS;
        let at = &self.keys().idempotency_bytes(done.bucket(), owner % BYTE_SHARDS);
        // Kept while its bucket can count: until two windows after it began.
        let end = done.bucket().saturating_add(2).saturating_mul(done.window);
        let ttl = kept_for(done.now, end);
        let what = "the bytes of stored responses, counted by other nodes all along";
        until_won(what, Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let row = self.row(at).await?;
                let bytes = u64::try_from(row.int("bytes")?.unwrap_or(0)).unwrap_or(u64::MAX);
                if size > share.saturating_sub(bytes) {
                    return Ok(Race::Won(false));
                }
                let total = (bytes + size).to_string();
                match self.put(at, &row.version(), Ttl::For(ttl), &[("bytes", total.as_bytes())]).await? {
                    true => Ok(Race::Won(true)),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }

    /// Releases `key` if `owner` still holds it unsettled.
    async fn release(&self, key: &str, owner: u64) -> Result<IdempotencySettled, StoreError> {
        self.settle_held(key, owner, |_| None).await
    }
}

/// A binding's fields as `row` holds them, with `changes` over them.
fn with(row: &Row, changes: &[(&'static str, Vec<u8>)]) -> Vec<(&'static str, Vec<u8>)> {
    let mut fields: Vec<(&'static str, Vec<u8>)> =
        ["request", "owner", "completed", "until", "expires", "ahead", "response"]
            .into_iter()
            .filter_map(|name| row.bytes(name).map(|b| (name, b.to_vec())))
            .filter(|(name, _)| !changes.iter().any(|(c, _)| c == name))
            .collect();
    fields.extend(changes.iter().cloned());
    fields
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn claim_idempotency(&self, c: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        let at = &self.keys().idempotency(&c.key);
        let what = "an Idempotency-Key claimed by another node all along";
        until_won(what, Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                let (row, ahead) = self.row_at(at, c.now.saturating_mul(NANOS)).await?;
                let ahead = secs_of(ahead);
                let now = c.now.saturating_add(ahead);
                if let Some(binding) = live(&row, now)? {
                    return state_of(&row, &binding, &c.request).map(Race::Won);
                }
                // Free: never claimed, expired, or left in flight past its time. Its times
                // are kept on the server's clock, with how far it was ahead of the claimer's:
                // its owner's renewals, which say a time of its clock alone, move by as much.
                let (owner, until, expires, ahead) = (
                    c.owner.to_string(),
                    c.in_flight_until.saturating_add(ahead).to_string(),
                    c.expires_at.saturating_add(ahead).to_string(),
                    ahead.to_string(),
                );
                let fields: [(&str, &[u8]); 6] = [
                    ("request", c.request.as_bytes()),
                    ("owner", owner.as_bytes()),
                    ("completed", b"0"),
                    ("until", until.as_bytes()),
                    ("expires", expires.as_bytes()),
                    ("ahead", ahead.as_bytes()),
                ];
                match self.put(at, &row.version(), Ttl::For(kept_for(c.now, c.expires_at)), &fields).await? {
                    true => Ok(Race::Won(IdempotencyState::Claimed)),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }

    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<IdempotencyState>, StoreError> {
        let (row, ahead) = self.row_at(&self.keys().idempotency(key), now.saturating_mul(NANOS)).await?;
        match live(&row, now.saturating_add(secs_of(ahead)))? {
            Some(binding) => state_of(&row, &binding, request).map(Some),
            None => Ok(None),
        }
    }

    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &IdempotencySettle,
    ) -> Result<IdempotencySettled, StoreError> {
        let done = match how {
            IdempotencySettle::Completed(done) => done,
            IdempotencySettle::Renewed { until } => {
                return self
                    .settle_held(key, owner, |row| {
                        // On the server's clock, by as much as its owner's claim moved (the
                        // owner renews, on the clock it claimed by); never past the binding's
                        // expiry.
                        let until = until.saturating_add(row.int("ahead").ok().flatten().unwrap_or(0));
                        let expires = row.int("expires").ok().flatten().unwrap_or(until);
                        Some(with(row, &[("until", until.min(expires).to_string().into_bytes())]))
                    })
                    .await;
            }
            _ => return self.release(key, owner).await,
        };
        let bytes = done.response.encode();
        let size = bytes.len() as u64;
        // The bytes first: a binding completed after its bytes failed to count would let the
        // store hold more than its bound; bytes counted for a binding that is then not held
        // only make the bound a little stricter until the bucket passes.
        if !self.count_bytes(done, owner, size).await? {
            return match self.release(key, owner).await? {
                IdempotencySettled::Settled => Ok(IdempotencySettled::Refused),
                other => Ok(other),
            };
        }
        self.settle_held(key, owner, |row| {
            Some(with(row, &[("completed", b"1".to_vec()), ("response", bytes.clone())]))
        })
        .await
    }
}
