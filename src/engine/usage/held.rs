//! The holds open on this node: bounded by `limits.max_holds` (and per tenant by
//! `limits.max_holds_per_tenant`), settled by the worker past
//! their `hold_timeout`, waited for and settled by shutdown, and summed for `Stats`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

/// A hold as the node's open holds see it: its id, when it is settled if still open, the units
/// it holds, and its settle by the node (past its deadline, or at shutdown). `Hold`'s shared
/// part implements it; the node holds them without knowing more of a hold.
pub(crate) trait OpenHold: Send + Sync {
    /// Its id among the node's open holds.
    fn id(&self) -> u64;
    /// Its tenant.
    fn tenant(&self) -> &crate::config::TenantId;
    /// When it is settled if still open (Unix seconds), read without its own lock.
    fn deadline(&self) -> i64;
    /// Units held and not recorded yet.
    fn held(&self) -> u64;
    /// Settles it as recorded so far, for `why`: whether it held units.
    fn close(&self, why: Closed) -> bool;
    /// Whether it is the spend side of another hold (a priced meter's cost, held on the
    /// plan's spend cap beside the meter's units): settled with the others, never counted
    /// toward `limits.max_holds` or `max_holds_per_tenant` (its request's hold counts once).
    fn side(&self) -> bool {
        false
    }
}

/// Why the node settled a hold its owner had not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Open past its `hold_timeout`.
    Expired,
    /// The engine shut down.
    Shutdown,
}

/// The holds open on this node, by id: each from the moment it holds units to its settle.
/// Bounded by `limits.max_holds`, and per tenant by `limits.max_holds_per_tenant`.
#[derive(Default)]
pub(crate) struct OpenHolds {
    open: Mutex<Open>,
    next: AtomicU64,
    /// Holds settled past their `hold_timeout`.
    pub(crate) expired: AtomicU64,
    /// Records through a hold after it was settled (by expiry or shutdown), charged as debt.
    pub(crate) records_after_settle: AtomicU64,
    /// Holds refused because `limits.max_holds` were open.
    pub(crate) refused_full: AtomicU64,
    /// Records through a hold beyond what it held, charged as debt.
    pub(crate) overruns: AtomicU64,
    /// Jobs' holds open ([`Tollgate::reserve_event`](crate::Tollgate::reserve_event)'s
    /// reservations), and the units they hold.
    jobs: AtomicU64,
    job_units: AtomicU64,
    /// No hold opens: the node is shutting down (set and read under the map's lock).
    stopped: std::sync::atomic::AtomicBool,
}

/// The open holds, and how many each tenant has open (requests' and jobs'): only tenants
/// with one open have an entry, so it is bounded as the holds are.
#[derive(Default)]
struct Open {
    holds: HashMap<u64, Arc<dyn OpenHold>>,
    tenants: HashMap<crate::config::TenantId, usize>,
    /// Of `holds`, the spend sides ([`OpenHold::side`]): not counted.
    sides: usize,
}

impl Open {
    /// One more hold of `tenant`, unless the node holds `max` or the tenant `per_tenant`.
    fn admit(
        &mut self,
        jobs: usize,
        tenant: &crate::config::TenantId,
        max: usize,
        per_tenant: usize,
    ) -> Result<(), Refused> {
        if (self.holds.len() - self.sides).saturating_add(jobs) >= max {
            return Err(Refused::Full);
        }
        let n = self.tenants.get(tenant).copied().unwrap_or(0);
        if n >= per_tenant {
            return Err(Refused::TenantFull);
        }
        self.tenants.insert(tenant.clone(), n + 1);
        Ok(())
    }

    /// One hold of `tenant` less.
    fn left(&mut self, tenant: &crate::config::TenantId) {
        if let Some(n) = self.tenants.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.tenants.remove(tenant);
            }
        }
    }
}

/// Why a hold was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `limits.max_holds` are open.
    Full,
    /// `limits.max_holds_per_tenant` of the tenant's are open.
    TenantFull,
    /// The node is shutting down.
    Stopping,
}

impl std::fmt::Debug for OpenHolds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenHolds").field("open", &self.len()).finish_non_exhaustive()
    }
}

impl OpenHolds {
    fn map(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new hold's id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `hold` as open, unless `max` are open already (requests' and jobs'), its
    /// tenant has `per_tenant` open, or the node stopped taking holds ([`stop`](Self::stop)):
    /// checked under the open holds' lock, so a hold is either among those shutdown waits for
    /// and settles, or refused.
    pub(crate) fn enter(&self, hold: Arc<dyn OpenHold>, max: usize, per_tenant: usize) -> Result<(), Refused> {
        let mut map = self.map();
        if self.stopped.load(Ordering::Relaxed) {
            return Err(Refused::Stopping);
        }
        if hold.side() {
            map.sides += 1;
        } else {
            map.admit(self.jobs(), hold.tenant(), max, per_tenant)?;
        }
        map.holds.insert(hold.id(), hold);
        Ok(())
    }

    /// No hold opens from now on (shutdown).
    pub(crate) fn stop(&self) {
        let _map = self.map();
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Opens a job's hold of `tenant`, unless `max` are open already (requests' and jobs')
    /// or the tenant has `per_tenant` open: checked and counted under the open holds' lock, as
    /// [`enter`](Self::enter) is.
    pub(crate) fn open_job(
        &self,
        tenant: &crate::config::TenantId,
        max: usize,
        per_tenant: usize,
    ) -> Result<(), Refused> {
        let mut map = self.map();
        map.admit(self.jobs(), tenant, max, per_tenant)?;
        self.jobs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A job's hold of `tenant` opened again (the same work reserved again), whatever the
    /// caps: it was open a moment ago.
    pub(crate) fn reopen_job(&self, tenant: &crate::config::TenantId) {
        let mut map = self.map();
        *map.tenants.entry(tenant.clone()).or_insert(0) += 1;
        self.jobs.fetch_add(1, Ordering::Relaxed);
    }

    fn jobs(&self) -> usize {
        usize::try_from(self.jobs.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// `id` is settled.
    pub(crate) fn leave(&self, id: u64) {
        let mut map = self.map();
        if let Some(hold) = map.holds.remove(&id) {
            if hold.side() {
                map.sides -= 1;
            } else {
                map.left(hold.tenant());
            }
        }
    }

    /// How many holds are open: requests' and jobs'.
    pub(crate) fn len(&self) -> usize {
        let map = self.map();
        (map.holds.len() - map.sides).saturating_add(self.jobs())
    }

    /// The units the open holds hold.
    pub(crate) fn units(&self) -> u64 {
        let holds: Vec<_> = self.map().holds.values().cloned().collect();
        holds.iter().map(|h| h.held()).sum::<u64>() + self.job_units.load(Ordering::Relaxed)
    }

    /// A job's hold (opened by [`open_job`](Self::open_job)) holds `units`.
    pub(crate) fn job_holds(&self, units: u64) {
        self.job_units.fetch_add(units, Ordering::Relaxed);
    }

    /// A job's hold of `tenant` went (recorded, released, or `expired`: its units stay spent).
    pub(crate) fn job_left(&self, tenant: &crate::config::TenantId, units: u64, expired: bool) {
        self.map().left(tenant);
        let _ = self.jobs.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
        let _ = self.job_units.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(units)));
        if expired {
            self.expired.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Settles every hold whose deadline is at or before `now` (Unix seconds) as recorded so
    /// far: the number settled. The map's lock is held only to find them, reading their deadlines
    /// without their own locks (a settle takes the map's lock with its own held: never the
    /// other way round).
    pub(crate) fn expire(&self, now: i64) -> usize {
        let due: Vec<_> = self.map().holds.values().filter(|h| h.deadline() <= now).cloned().collect();
        let mut n = 0;
        for hold in due {
            if hold.close(Closed::Expired) {
                n += 1;
            }
            self.leave(hold.id());
        }
        self.expired.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Settles every open hold as recorded so far (shutdown): the number settled.
    pub(crate) fn close_all(&self) -> usize {
        let all: Vec<_> = {
            let mut map = self.map();
            map.tenants.clear();
            map.sides = 0;
            map.holds.drain().map(|(_, h)| h).collect()
        };
        all.iter().filter(|h| h.close(Closed::Shutdown)).count()
    }

    /// Waits until no request's hold is open, or `until`: whether none is. (A job's hold is
    /// not waited for: it outlives the process as its rule says, its units spent.)
    pub(crate) async fn drained(&self, until: tokio::time::Instant) -> bool {
        loop {
            if self.map().holds.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            let step = tokio::time::Instant::now() + std::time::Duration::from_millis(10);
            tokio::time::sleep_until(step.min(until)).await;
        }
    }
}
