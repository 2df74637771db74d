//! The one read-modify-write loop of the DynamoStore: an attempt reads what its conditional
//! write depends on, writes on the condition that it is still so, and wins or loses the race;
//! a lost race is tried again (from what the loss showed), backing off, up to `ATTEMPTS`.
//! Each verb states only its condition and its write.

use std::{future::Future, pin::Pin};

use super::{backoff, DynamoStore, ATTEMPTS};
use crate::store::StoreError;

/// One attempt, as `until_won` runs it.
pub(super) type Attempt<'a, T, S> = Pin<Box<dyn Future<Output = Result<Race<T, S>, StoreError>> + Send + 'a>>;

/// What one attempt came to.
pub(super) enum Race<T, S = ()> {
    /// The write held: the verb's answer.
    Won(T),
    /// Another writer came first (the condition failed): the next attempt starts from this.
    Lost(S),
}

impl DynamoStore {
    /// Runs `attempt` until one wins its race, starting from `from`: each gets what the last
    /// lost race left and the attempt's number. A lost race is tried again at once twice, then
    /// after a backoff; past `ATTEMPTS`, `Conflict(what)`.
    pub(super) async fn until_won<'a, S, T>(
        &self,
        what: &'static str,
        from: S,
        attempt: impl FnMut(S, u32) -> Attempt<'a, T, S>,
    ) -> Result<T, StoreError> {
        self.until_won_within(ATTEMPTS, what, from, attempt).await
    }

    /// [`until_won`](Self::until_won) with `attempts` attempts (an item every node of a busy
    /// tenant writes gets more).
    pub(super) async fn until_won_within<'a, S, T>(
        &self,
        attempts: u32,
        what: &'static str,
        from: S,
        mut attempt: impl FnMut(S, u32) -> Attempt<'a, T, S>,
    ) -> Result<T, StoreError> {
        let mut state = from;
        for n in 0..attempts {
            match attempt(state, n).await? {
                Race::Won(answer) => return Ok(answer),
                Race::Lost(next) => {
                    state = next;
                    if n > 1 {
                        backoff(n).await;
                    }
                }
            }
        }
        Err(StoreError::Conflict(what))
    }
}
