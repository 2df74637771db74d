//! The one read-modify-write loop of the stores that write under a condition (DynamoDB, Redis):
//! an attempt reads what its conditional write depends on, writes on the condition that it is
//! still so, and wins or loses the race; a lost race is tried again (from what the loss
//! showed), as the verb's [`Retries`] say. Each verb states only its condition, its write and
//! how it retries.

use std::{future::Future, pin::Pin, time::Duration};

use crate::store::StoreError;

/// How many times a call that lost a race (a transaction conflict, a counter created under
/// it) is tried, at most.
pub(crate) const ATTEMPTS: u32 = 12;

/// One attempt, as `until_won` runs it.
pub(crate) type Attempt<'a, T, S> = Pin<Box<dyn Future<Output = Result<Race<T, S>, StoreError>> + Send + 'a>>;

/// What one attempt came to.
pub(crate) enum Race<T, S = ()> {
    /// The write held: the verb's answer.
    Won(T),
    /// Another writer came first (the condition failed): the next attempt starts from this,
    /// after the backoff its [`Retries`] say.
    Lost(S),
    /// Not a race lost but a step of the write's own (a counter created first, a grant found
    /// written under its id): the next attempt starts from this at once.
    #[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
    Again(S),
}

/// How a verb tries again after a lost race: how many attempts, and from which one on it
/// backs off (exponentially, with jitter) before the next.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retries {
    attempts: u32,
    /// Lost races before the first backoff (`None`: never).
    backoff_after: Option<u32>,
}

impl Retries {
    /// [`ATTEMPTS`], backing off after every lost race: a transaction, a plan change, a
    /// grant, a refund, an alert, what every node writes at once.
    pub(crate) const BACKING_OFF: Self = Self { attempts: ATTEMPTS, backoff_after: Some(1) };
    /// [`ATTEMPTS`], the first three again at once, then backing off: a reservation, which
    /// a request may wait on (a counter created under it, a few nodes refilling together, are
    /// settled by the next read).
    #[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
    pub(crate) const QUICK_FIRST: Self = Self { attempts: ATTEMPTS, backoff_after: Some(4) };
    /// [`ATTEMPTS`], never backing off: a release, whose next attempt asks for no more than
    /// the last one saw (it only shrinks).
    #[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
    pub(crate) const AT_ONCE: Self = Self { attempts: ATTEMPTS, backoff_after: None };

    /// The same, with `attempts` attempts (an item every node of a busy tenant writes gets
    /// more).
    pub(crate) const fn attempts(self, attempts: u32) -> Self {
        Self { attempts, ..self }
    }

    /// Whether to back off after the attempt numbered `n` (from 0) lost.
    fn backs_off_after(self, n: u32) -> bool {
        self.backoff_after.is_some_and(|after| n + 1 >= after)
    }
}

/// Sleeps before attempt `attempt` of a call that lost a race: exponential, with jitter.
async fn backoff(attempt: u32) {
    let base = 10u64 << attempt.min(7);
    // From the OS, not RandomState: copies of one SnapStart snapshot back off apart.
    let jitter = crate::base::draw_u64() % base;
    tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
}

/// Runs `attempt` until one wins its race, starting from `from`: each gets what the last
/// lost race left and the attempt's number. A lost race is tried again as `retries` say;
/// past its attempts, `Conflict(what)`.
pub(crate) async fn until_won<'a, S, T>(
    what: &'static str,
    retries: Retries,
    from: S,
    mut attempt: impl FnMut(S, u32) -> Attempt<'a, T, S>,
) -> Result<T, StoreError> {
    let mut state = from;
    for n in 0..retries.attempts {
        match attempt(state, n).await? {
            Race::Won(answer) => return Ok(answer),
            Race::Lost(next) => {
                state = next;
                if retries.backs_off_after(n) && n + 1 < retries.attempts {
                    backoff(n).await;
                }
            }
            Race::Again(next) => state = next,
        }
    }
    Err(StoreError::Conflict(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_backs_off_from_its_own_attempt() {
        let after = |r: Retries| (0..5).filter(|n| r.backs_off_after(*n)).collect::<Vec<_>>();
        assert_eq!(after(Retries::BACKING_OFF), [0, 1, 2, 3, 4]);
        assert_eq!(after(Retries::QUICK_FIRST), [3, 4]);
        assert_eq!(after(Retries::AT_ONCE), [] as [u32; 0]);
        assert_eq!(Retries::BACKING_OFF.attempts(24).attempts, 24);
    }
}
