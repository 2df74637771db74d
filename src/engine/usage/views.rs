//! The tenants' own usage views (the usage route, `Tollgate::tenant_usage`), kept per tenant
//! on this node: one refresh per tenant per second at most, however often it is polled, and
//! at most `usage.view_refresh_rate` refreshes for the whole node (past it, a view up to
//! [`STALE_NANOS`] old is answered, else none). The views are keyed by tenants the directory
//! knows (never by what a client sends unchecked), at most [`MAX_VIEWS`] of them, the least
//! recently used dropped first.

use std::sync::Arc;

use bytes::Bytes;

use crate::base::{KeyHash, KeyScopes};
use crate::config::TenantId;

/// The most tenants whose views one node keeps.
pub(crate) const MAX_VIEWS: u64 = 10_000;

/// How long a view is served before it is made again (nanoseconds).
pub(crate) const FRESH_NANOS: i64 = 1_000_000_000;

/// How old a view may be when the node's budget of refreshes is spent and it is answered
/// instead of a new one (nanoseconds): a minute.
pub(crate) const STALE_NANOS: i64 = 60 * 1_000_000_000;

/// How long a tenant's closed usage ([`History`]) is answered before it is read again
/// (seconds): a minute.
pub(crate) const HISTORY_FRESH_SECS: i64 = 60;

/// How long after a UTC day ends its usage counts as closed (seconds): an hour, past the
/// flushes of every node (`usage.flush_interval`, 10 s by default, and their retries).
pub(crate) const SETTLE_SECS: i64 = 3_600;

/// A tenant's closed usage: its units per meter and UTC day from `lo` (the start of its
/// previous billing period) up to `split` (the start of the UTC day an hour ago), as the store
/// held them at `read_at` (Unix seconds). It changes only by late usage: events of up to 35
/// days old, batches retried after an outage; so it is read at most once a minute
/// ([`HISTORY_FRESH_SECS`]), while the open days are read at every refresh. Per day, not per
/// window: every bound it is read by (a period's start, the split) is a UTC midnight, and at
/// most 62 days a meter are kept, whatever `usage.window`.
#[derive(Debug)]
pub(crate) struct History {
    pub(crate) lo: i64,
    pub(crate) split: i64,
    pub(crate) read_at: i64,
    /// Units per (meter, UTC day's start).
    pub(crate) days: std::collections::BTreeMap<(crate::base::MeterId, i64), u64>,
}

impl History {
    /// Where closed usage ends at `now`: the start of the UTC day an hour ago.
    pub(crate) fn split_at(now: i64) -> i64 {
        let settled = now.saturating_sub(SETTLE_SECS);
        settled - settled.rem_euclid(86_400)
    }

    /// Whether it is the closed usage from `lo` at `now`, read within the last minute.
    pub(crate) fn serves(&self, lo: i64, now: i64) -> bool {
        self.lo == lo
            && self.split == Self::split_at(now).max(lo)
            && (0..HISTORY_FRESH_SECS).contains(&now.saturating_sub(self.read_at))
    }
}

/// A tenant's view as last made: its JSON body and its entity tag, and the scopes of the
/// tenant's keys read with it (who may read it).
#[derive(Debug, Clone)]
pub(crate) struct UsageView {
    /// The JSON body.
    pub(crate) body: Bytes,
    /// Its weak entity tag, quoted: a hash of the body without the time it was made, so that
    /// a view made again with the same numbers keeps its tag (a client revalidating gets 304).
    pub(crate) etag: String,
    /// The tenant's live keys and their scopes when the view was made (a key issued since is
    /// not among them until the next view, a second later, or a minute while the node's
    /// budget of refreshes is spent).
    pub(crate) keys: Box<[(KeyHash, KeyScopes)]>,
    /// When it was made (Unix nanoseconds; 0 until kept).
    pub(crate) made_at: i64,
}

impl UsageView {
    /// The view of `body`, whose numbers without the time they were read are `numbers`, of a
    /// tenant whose live keys have `keys`' scopes.
    pub(crate) fn new(body: Bytes, numbers: &[u8], keys: Box<[(KeyHash, KeyScopes)]>) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(numbers);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self { body, etag: format!("W/\"{hex}\""), keys, made_at: 0 }
    }
}

/// A view younger than this (nanoseconds) is made again only while the node's budget holds
/// more than half its burst: the other half goes to tenants whose views are older, or who
/// have none, so that tenants polling in a tight loop cannot keep others' views from being
/// made.
pub(crate) const YOUNG_NANOS: i64 = 10 * 1_000_000_000;

/// What a tenant's slot keeps: its last view, or the time its last refresh failed (the polls
/// of the next second are refused without asking the store again).
enum Kept {
    View(Arc<UsageView>, i64),
    Failed(i64),
}

impl Kept {
    /// Whether it may still be answered at `now`: made (or failed) less than a second before.
    fn fresh(&self, now: i64) -> bool {
        let (Kept::View(_, at) | Kept::Failed(at)) = self;
        (0..FRESH_NANOS).contains(&now.saturating_sub(*at))
    }

    /// The view, if made less than [`STALE_NANOS`] before `now`.
    fn recent(&self, now: i64) -> Option<&Arc<UsageView>> {
        match self {
            Kept::View(view, at) if (0..STALE_NANOS).contains(&now.saturating_sub(*at)) => Some(view),
            _ => None,
        }
    }
}

/// One tenant's slot: what it keeps, behind a lock its refresh holds (the polls meanwhile wait
/// for it rather than read the store too), and how many refreshes ended (a poll that waited
/// for one takes its outcome, however long it took).
#[derive(Default)]
struct SlotInner {
    refreshes: std::sync::atomic::AtomicU64,
    kept: tokio::sync::Mutex<Option<Kept>>,
}

type Slot = Arc<SlotInner>;

/// The views of this node's tenants.
pub(crate) struct UsageViews {
    slots: moka::sync::Cache<TenantId, Slot>,
    /// The node's budget of refreshes: the theoretical arrival time of a GCRA bucket
    /// (`usage.view_refresh_rate`), Unix nanoseconds.
    budget: std::sync::Mutex<i64>,
    /// The tenants' closed usage as their last refreshes read it, each dropped a minute after
    /// it was kept (it is not used later): at most as many as the budget makes in a minute.
    histories: moka::sync::Cache<TenantId, Arc<History>>,
}

impl std::fmt::Debug for UsageViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageViews").field("tenants", &self.slots.entry_count()).finish()
    }
}

impl Default for UsageViews {
    fn default() -> Self {
        Self {
            slots: crate::tenant::lru(MAX_VIEWS).build(),
            budget: std::sync::Mutex::new(0),
            histories: crate::tenant::lru(MAX_VIEWS)
                .time_to_live(std::time::Duration::from_secs(HISTORY_FRESH_SECS as u64))
                .build(),
        }
    }
}

/// Why no view was answered.
#[derive(Debug)]
pub(crate) enum NoView<E> {
    /// `make` failed now.
    Failed(E),
    /// A refresh failed less than a second before: not tried again yet.
    FailedRecently,
    /// The node's budget of refreshes is spent, and no view of the last minute is kept.
    OverBudget,
}

impl UsageViews {
    /// `tenant`'s view at `now` (Unix nanoseconds): the last one made if it was read less than
    /// a second before, else one `make` makes (one call at a time per tenant: the others wait
    /// for it and take its view), `make` gives it.
    /// A refresh that fails is remembered for a second: the polls meanwhile are refused
    /// without asking the store again. A refresh takes one of the node's `budget`; none left,
    /// the view kept is answered if it was made within the last minute (either way the
    /// refresh is counted in `refused`).
    ///
    /// # Errors
    /// What `make` returns, [`NoView::FailedRecently`] or [`NoView::OverBudget`].
    pub(crate) async fn view<E, F>(
        &self,
        tenant: &TenantId,
        now: impl Fn() -> i64,
        budget: crate::config::Rate,
        refused: &crate::metrics::Tally,
        make: impl FnOnce() -> F,
    ) -> Result<Arc<UsageView>, NoView<E>>
    where
        F: std::future::Future<Output = Result<UsageView, E>>,
    {
        let slot = self.slots.get_with_by_ref(tenant, Slot::default);
        let seen = slot.refreshes.load(std::sync::atomic::Ordering::Acquire);
        let mut kept = slot.kept.lock().await;
        // Read after the lock: a refresh that held it meanwhile has just ended, and its outcome
        // is this poll's, even if it took more than a second.
        let waited = slot.refreshes.load(std::sync::atomic::Ordering::Acquire) != seen;
        match kept.as_ref().filter(|k| waited || k.fresh(now())) {
            Some(Kept::View(view, _)) => return Ok(view.clone()),
            Some(Kept::Failed(_)) => return Err(NoView::FailedRecently),
            None => {}
        }
        // Its numbers are those of when the refresh started.
        let started = now();
        // A young view leaves the last half of the budget to older ones.
        let young =
            matches!(kept.as_ref(), Some(Kept::View(_, at)) if (0..YOUNG_NANOS).contains(&started.saturating_sub(*at)));
        if !self.spend(started, budget, young) {
            refused.add(1);
            return match kept.as_ref().and_then(|k| k.recent(started)) {
                Some(view) => Ok(view.clone()),
                None => Err(NoView::OverBudget),
            };
        }
        let made = make().await;
        let answer = match made {
            Ok(view) => {
                let view = Arc::new(UsageView { made_at: started, ..view });
                *kept = Some(Kept::View(view.clone(), started));
                Ok(view)
            }
            Err(e) => {
                *kept = Some(Kept::Failed(started));
                Err(NoView::Failed(e))
            }
        };
        slot.refreshes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        answer
    }

    /// Takes one refresh of the node's budget at `now`, if one is left: at most `rate.count()`
    /// at once, then one each `rate.interval()`; for a `young` view, only while more than
    /// half the burst is left.
    fn spend(&self, now: i64, rate: crate::config::Rate, young: bool) -> bool {
        let interval = i64::try_from(rate.interval().as_nanos()).unwrap_or(i64::MAX).max(1);
        let tau = interval.saturating_mul(i64::from(rate.count().get()));
        let room = if young { tau / 2 } else { tau };
        let mut tat = self.budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Never further ahead than this rate's burst: a reload that lowers the rate waits one
        // burst of it at most, not the old rate's.
        let next = (*tat).max(now).min(now.saturating_add(tau)).saturating_add(interval);
        if next.saturating_sub(now) > room.max(interval) {
            return false;
        }
        *tat = next;
        true
    }

    /// `tenant`'s closed usage as its views last read it, within the last minute.
    pub(crate) fn history(&self, tenant: &TenantId) -> Option<Arc<History>> {
        self.histories.get(tenant)
    }

    /// Keeps `history` as `tenant`'s closed usage, for a minute at most.
    pub(crate) fn keep_history(&self, tenant: &TenantId, history: Option<Arc<History>>) {
        match history {
            Some(h) => self.histories.insert(tenant.clone(), h),
            None => self.histories.invalidate(tenant),
        }
    }

    /// `tenant`'s view if one read less than a second before is kept, without waiting for a
    /// refresh under way.
    pub(crate) fn fresh(&self, tenant: &TenantId, now: i64) -> Option<Arc<UsageView>> {
        let slot = self.slots.get(tenant)?;
        let kept = slot.kept.try_lock().ok()?;
        match kept.as_ref().filter(|k| k.fresh(now)) {
            Some(Kept::View(view, _)) => Some(view.clone()),
            _ => None,
        }
    }
}
