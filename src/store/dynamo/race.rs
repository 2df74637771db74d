//! The DynamoStore's use of the stores' read-modify-write loop ([`crate::store::race`]), and
//! its transactions, sent again while they conflict.

use aws_sdk_dynamodb::types::TransactWriteItem;

pub(super) use crate::store::race::{Attempt, Race, Retries, ATTEMPTS};

use super::{cancellation, retryable, sdk, DynamoStore};
use crate::store::StoreError;

impl DynamoStore {
    /// [`until_won`](crate::store::race::until_won), for this store's verbs.
    pub(super) async fn until_won<'a, S, T>(
        &self,
        what: &'static str,
        retries: Retries,
        from: S,
        attempt: impl FnMut(S, u32) -> Attempt<'a, T, S>,
    ) -> Result<T, StoreError> {
        crate::store::race::until_won(what, retries, from, attempt).await
    }

    /// Sends a transaction, again (backing off, [`ATTEMPTS`] times) while it conflicts with
    /// another or is throttled: `Ok(None)` when it went through, `Ok(Some(reasons))` when a
    /// condition failed (one code per action); [`StoreError::Conflict`] naming `what` when every
    /// attempt conflicted.
    pub(super) async fn transact(
        &self,
        actions: Vec<TransactWriteItem>,
        what: &'static str,
    ) -> Result<Option<Vec<Option<String>>>, StoreError> {
        let actions = &actions;
        self.until_won(what, Retries::BACKING_OFF, (), |(), _| {
            Box::pin(async move {
                match self.client.transact_write_items().set_transact_items(Some(actions.clone())).send().await {
                    Ok(_) => Ok(Race::Won(None)),
                    Err(e) => match cancellation(&e) {
                        Some(r) if r.iter().flatten().any(|c| c == "ConditionalCheckFailed") => Ok(Race::Won(Some(r))),
                        Some(r) if retryable(&r) => Ok(Race::Lost(())),
                        _ => Err(sdk(e)),
                    },
                }
            })
        })
        .await
    }
}
