//! The one read-modify-write loop of the stores that write under a condition (DynamoDB, Redis):
//! an attempt reads what its conditional write depends on, writes on the condition that it is
//! still so, and wins or loses the race; a lost race is tried again (from what the loss
//! showed), as the verb's [`Retries`] say. Each verb states only its condition, its write and
//! how it retries.

use std::{future::Future, pin::Pin, time::Duration};

use tokio::time::Instant;

use crate::store::{limited::call_deadline, StoreError};

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
    /// Under a deadline, tried until it (not `attempts`): a race lost costs little.
    to_deadline: bool,
}

impl Retries {
    /// [`ATTEMPTS`], backing off after every lost race: a transaction, a plan change, a
    /// grant, a refund, an alert, what every node writes at once.
    pub(crate) const BACKING_OFF: Self = Self { attempts: ATTEMPTS, backoff_after: Some(1), to_deadline: false };
    /// [`ATTEMPTS`], the first three again at once, then backing off: a reservation, which
    /// a request may wait on (a counter created under it, a few nodes refilling together, are
    /// settled by the next read).
    #[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
    pub(crate) const QUICK_FIRST: Self = Self { attempts: ATTEMPTS, backoff_after: Some(4), to_deadline: false };
    /// Four times [`ATTEMPTS`] (under a deadline, until it), never backing off: a write whose
    /// lost race answers the row as the winner left it (Redis), so the next attempt starts
    /// from the latest state without reading it again, and each race lost is another node's
    /// call done (a queue, not a lottery: of 32 nodes writing a row at once, each is served
    /// within 32 attempts of one round trip, about 16 on average).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) const FROM_ANSWER: Self = Self { attempts: 4 * ATTEMPTS, backoff_after: None, to_deadline: true };
    /// [`ATTEMPTS`], never backing off: a release, whose next attempt asks for no more than
    /// the last one saw (it only shrinks).
    #[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
    pub(crate) const AT_ONCE: Self = Self { attempts: ATTEMPTS, backoff_after: None, to_deadline: false };

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

tokio::task_local! {
    /// How long the attempt running waited for something of the node's own (a row's turn),
    /// which is not the attempt's cost.
    static WAITED: std::cell::Cell<Duration>;
}

/// Adds `wait` to what the attempt running waited for on the node ([`until_won`] takes it
/// from the attempt's time).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn waited_for(wait: Duration) {
    let _ = WAITED.try_with(|w| w.set(w.get() + wait));
}

fn waited() -> Option<Duration> {
    WAITED.try_with(std::cell::Cell::get).ok()
}

/// How long a call that lost a race sleeps before attempt `attempt`: exponential, with jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 10u64 << attempt.min(7);
    // From the OS, not RandomState: copies of one SnapStart snapshot back off apart.
    let jitter = crate::base::draw_u64() % base;
    Duration::from_millis(base / 2 + jitter)
}

/// The least time an attempt is given before a call's deadline: a round trip or two to a
/// store on the same network, with room to spare. An attempt that would start later answers
/// busy instead, before the deadline cuts it.
pub(crate) const ATTEMPT_LEAST: Duration = Duration::from_millis(5);

/// Whether an attempt of `took` (at least [`ATTEMPT_LEAST`]) after a pause of `pause` still
/// fits before the call's deadline, if it has one.
pub(crate) fn fits(pause: Duration, took: Duration) -> bool {
    call_deadline().is_none_or(|d| Instant::now() + pause + took.max(ATTEMPT_LEAST) < d)
}

/// The most attempts of a call made under a deadline ([`call_deadline`]): the deadline bounds
/// it, this only a runaway.
const ATTEMPTS_UNDER_DEADLINE: u32 = 16 * ATTEMPTS;

/// Runs `attempt` until one wins its race, starting from `from`: each gets what the last
/// lost race left and the attempt's number. A lost race is tried again as `retries` say;
/// past its attempts, `Conflict(what)`.
///
/// A call made under a deadline (a [`Limited`](super::limited) store's: the request's
/// `usage.store_timeout`, a background call's limit) tries again only while another attempt
/// (as long as the last took, twice over, after its backoff) ends before the deadline, and
/// answers `Conflict(what)` then, before the deadline cuts it; a verb whose races cost little
/// ([`Retries::FROM_ANSWER`]) is bounded by the deadline alone, not its count. A row other
/// nodes win every time is a busy tenant, answered by the store; a timeout would say the store
/// is down (and feed the breaker that fails every tenant fast).
pub(crate) async fn until_won<'a, S, T>(
    what: &'static str,
    retries: Retries,
    from: S,
    mut attempt: impl FnMut(S, u32) -> Attempt<'a, T, S>,
) -> Result<T, StoreError> {
    let deadline = call_deadline();
    let most = match deadline {
        Some(_) if retries.to_deadline => retries.attempts.max(ATTEMPTS_UNDER_DEADLINE),
        _ => retries.attempts,
    };
    let mut state = from;
    for n in 0..most {
        let started = Instant::now();
        let lost = match WAITED.scope(std::cell::Cell::new(Duration::ZERO), attempt(state, n)).await? {
            Race::Won(answer) => return Ok(answer),
            Race::Lost(next) => {
                state = next;
                true
            }
            Race::Again(next) => {
                state = next;
                false
            }
        };
        let pause = if lost && retries.backs_off_after(n) { backoff(n) } else { Duration::ZERO };
        // The attempt's own time: a wait of its own (a row's turn on the node) is not its cost.
        let took = started.elapsed().saturating_sub(waited().unwrap_or_default());
        let next_fits = fits(pause, took * 2);
        if n + 1 >= most || !next_fits {
            break;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
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

    /// Attempts of 10 ms that all lose, counted.
    async fn losing(retries: Retries, tried: &std::sync::atomic::AtomicU32) -> Result<(), StoreError> {
        until_won("a row others win", retries, (), |(), _| {
            Box::pin(async move {
                tried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(Race::<(), ()>::Lost(()))
            })
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_under_a_deadline_tries_while_an_attempt_fits_and_answers_before_it() {
        let tried = std::sync::atomic::AtomicU32::new(0);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(250);
        // Bounded by the deadline alone: 24 attempts of 10 ms fit in 250 ms, past a count of 12.
        let e =
            crate::store::limited::as_call_ending(deadline, losing(Retries::FROM_ANSWER.attempts(12), &tried)).await;
        assert!(matches!(e, Err(StoreError::Conflict(_))), "{e:?}");
        let n = tried.load(std::sync::atomic::Ordering::Relaxed);
        assert!((20..=24).contains(&n), "{n} attempts");
        assert!(Instant::now() < deadline, "answered before the deadline: {:?}", Instant::now() - start);
        // Without a deadline: the verb's count; another verb keeps its count under one too.
        let tried = std::sync::atomic::AtomicU32::new(0);
        assert!(losing(Retries::FROM_ANSWER.attempts(12), &tried).await.is_err());
        assert_eq!(tried.load(std::sync::atomic::Ordering::Relaxed), 12);
        let tried = std::sync::atomic::AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(crate::store::limited::as_call_ending(deadline, losing(Retries::AT_ONCE, &tried)).await.is_err());
        assert_eq!(tried.load(std::sync::atomic::Ordering::Relaxed), ATTEMPTS);
        // Backing off: no pause runs past the deadline either.
        let tried = std::sync::atomic::AtomicU32::new(0);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(250);
        let e = crate::store::limited::as_call_ending(deadline, losing(Retries::BACKING_OFF, &tried)).await;
        assert!(matches!(e, Err(StoreError::Conflict(_))), "{e:?}");
        assert!(Instant::now() < deadline, "answered before the deadline: {:?}", Instant::now() - start);
    }
}
