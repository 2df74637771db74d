use std::time::Duration;

use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use crate::engine::{usage::taken::Prefetch, Tollgate};

/// The engine's background work: flushes usage every `usage.flush_interval` and exports
/// closed windows, refills quota leases before they run out, evicts idle tenants, revalidates
/// the tenant directory within `limits.directory_ttl`.
///
/// Nothing runs unless the caller spawns [`run`](Self::run); there are no hidden threads.
/// It returns after [`Tollgate::shutdown`], which does the final flush itself (so it also
/// works where nothing runs between requests, such as AWS Lambda).
#[must_use = "the worker does nothing until `run()` is spawned"]
pub struct Worker {
    tollgate: Tollgate,
    prefetch: mpsc::Receiver<Prefetch>,
    shutdown: watch::Receiver<bool>,
    flushes: bool,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    pub(crate) fn new(tollgate: Tollgate, prefetch: mpsc::Receiver<Prefetch>, shutdown: watch::Receiver<bool>) -> Self {
        Self { tollgate, prefetch, shutdown, flushes: true }
    }

    /// A worker that neither flushes nor exports: it refills leases, evicts idle tenants and
    /// revalidates the directory, and leaves flushes and exports to the caller (as on AWS
    /// Lambda's on-demand model, whose process is frozen between invocations: a flush frozen
    /// half-way would hold the pipeline until the next thaw).
    pub fn without_flush(mut self) -> Self {
        self.flushes = false;
        self
    }

    /// The engine this worker serves.
    #[must_use]
    pub fn handle(&self) -> &Tollgate {
        &self.tollgate
    }

    /// Runs until [`Tollgate::shutdown`] is called. Exports and reconciliations run beside the
    /// rest, in the same task, so a slow billing system never delays a flush, a lease refill
    /// or an eviction.
    pub async fn run(self) {
        let exports = Self::exports(self.tollgate.clone(), self.shutdown.clone(), self.flushes);
        let reconciliations = Self::reconciliations(self.tollgate.clone(), self.shutdown.clone(), self.flushes);
        let expiries = Self::credit_expiries(self.tollgate.clone(), self.shutdown.clone());
        let holds = Self::hold_expiries(self.tollgate.clone(), self.shutdown.clone());
        let places = Self::places(self.tollgate.clone(), self.shutdown.clone());
        let stale = Self::stale_leases(self.tollgate.clone(), self.shutdown.clone());
        let follow = Self::follow_directory(self.tollgate.clone(), self.shutdown.clone());
        let alerts = Self::alerts(self.tollgate.clone(), self.shutdown.clone());
        let recharges = Self::recharges(self.tollgate.clone(), self.shutdown.clone());
        let tiers = Self::tiers(self.tollgate.clone(), self.shutdown.clone());
        let past_due = Self::past_due(self.tollgate.clone(), self.shutdown.clone());
        tokio::join!(
            self.background(),
            exports,
            reconciliations,
            expiries,
            holds,
            places,
            alerts,
            stale,
            recharges,
            follow,
            tiers,
            past_due
        );
        tracing::debug!("tollgate worker stopped");
    }

    /// An export pass every `export.interval` (after the first flush interval, so a node
    /// starting up flushes before it exports).
    async fn exports(tollgate: Tollgate, shutdown: watch::Receiver<bool>, enabled: bool) {
        if !tollgate.exporter().has_sink() || !enabled {
            return;
        }
        let first = tollgate.shared().runtime().load().config.usage.flush_interval;
        let every = || tollgate.shared().runtime().load().config.export.interval;
        periodically(shutdown, first, every, || async {
            if let Err(e) = tollgate.export().await {
                tracing::warn!(error = %e, "usage export failed; retried at the next pass");
            }
            true
        })
        .await;
    }

    /// A pass settling the holds open past their `hold_timeout` every second, as recorded so
    /// far (their other units given back).
    async fn hold_expiries(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || Duration::from_secs(1);
        periodically(shutdown, every(), every, || async {
            let expired = tollgate.units().holds().expire(tollgate.shared().clock().unix_secs());
            if expired > 0 {
                tracing::warn!(holds = expired, "holds open past limits.hold_timeout were settled as recorded so far");
            }
            true
        })
        .await;
    }

    /// A pass every second stopping the leases whose reservation was not renewed in time
    /// ([`Tollgate::stop_stale_leases`]): beside the flushes, which a slow store may delay.
    async fn stale_leases(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || Duration::from_secs(1);
        periodically(shutdown, every(), every, || async {
            let stopped = tollgate.stop_stale_leases();
            if stopped > 0 {
                tracing::warn!(stopped, "leases not renewed in time (limits.reservation_expiry) wait for a store call");
            }
            true
        })
        .await;
    }

    /// A pass reading the directory's feed of tenants changed every second
    /// ([`Tollgate::follow_directory`]): a change written anywhere applies here within a
    /// second. A failed read is logged at debug and tried again a second later.
    async fn follow_directory(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || Duration::from_secs(1);
        periodically(shutdown, Duration::ZERO, every, || async {
            if let Err(e) = tollgate.follow_directory().await {
                tracing::debug!(error = %e, "the directory's feed of tenants changed could not be read");
            }
            true
        })
        .await;
    }

    /// The daily passes, a minute after the start (a fleet restarted daily still runs them),
    /// then every day: the check of tiers ([`Tollgate::check_tiers`]) and the audit's prune
    /// ([`Tollgate::prune_audit`]).
    async fn tiers(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || Duration::from_secs(86_400);
        periodically(shutdown, Duration::from_secs(60), every, || async {
            match tollgate.check_tiers().await {
                Ok(0) => {}
                Ok(moved) => tracing::info!(moved, "tiers: tenants moved to the tier they now unlock"),
                Err(e) => tracing::warn!(error = %e, "tiers: the daily check failed; tried again tomorrow"),
            }
            match tollgate.prune_audit().await {
                Ok(0) => {}
                Ok(gone) => tracing::info!(gone, "audit: records past their retention removed"),
                Err(e) => tracing::warn!(error = %e, "audit: the daily prune failed; tried again tomorrow"),
            }
            true
        })
        .await;
    }

    /// The end of graces past due ([`Tollgate::check_past_due`]): a minute after the start,
    /// then every 10 minutes.
    async fn past_due(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || Duration::from_secs(600);
        periodically(shutdown, Duration::from_secs(60), every, || async {
            match tollgate.check_past_due().await {
                Ok(0) => {}
                Ok(moved) => tracing::info!(moved, "past due: tenants moved at the end of their grace"),
                Err(e) => tracing::warn!(error = %e, "past due: the pass failed; tried again in 10 minutes"),
            }
            true
        })
        .await;
    }

    /// A pass over this node's places of fleet concurrencies every second: renewed every
    /// third of `limits.place_ttl`, a spare given back after a second.
    async fn places(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || Duration::from_secs(1);
        periodically(shutdown, every(), every, || async {
            tollgate.gate().places().tend().await;
            true
        })
        .await;
    }

    /// A pass delivering due alerts every second ([`Tollgate::deliver_alerts`]), when the
    /// configuration sends any; delivered and dead rows past their keep time are pruned every
    /// hour.
    async fn alerts(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || crate::engine::alerts::PASS_EVERY;
        let next_prune = std::sync::Arc::new(std::sync::Mutex::new(Instant::now() + Duration::from_secs(60)));
        periodically(shutdown, every(), every, || {
            let (tollgate, next_prune) = (tollgate.clone(), next_prune.clone());
            async move {
                if !tollgate.alerts().configured() {
                    return true;
                }
                let report = tollgate.deliver_alerts().await;
                if report.claimed > 0 {
                    tracing::debug!(
                        delivered = report.delivered,
                        retried = report.retried,
                        dead = report.dead,
                        "alerts delivered"
                    );
                }
                let prune = {
                    let mut next = next_prune.lock().unwrap_or_else(|e| e.into_inner());
                    let due = Instant::now() >= *next;
                    if due {
                        *next = Instant::now() + Duration::from_secs(3_600);
                    }
                    due
                };
                if prune {
                    tollgate.alerts().prune().await;
                }
                true
            }
        })
        .await;
    }

    /// Delivers the recharges this node's refills claim, as they are claimed
    /// ([`Tollgate::deliver_recharges`]).
    async fn recharges(tollgate: Tollgate, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                () = tollgate.recharge_claimed() => {
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => return,
                        _ = tollgate.deliver_recharges() => {}
                    }
                }
            }
        }
    }

    /// A pass closing expired credit grants every minute ([`Tollgate::expire_credits`]): on
    /// every node, each grant closed once across the fleet.
    async fn credit_expiries(tollgate: Tollgate, shutdown: watch::Receiver<bool>) {
        let every = || Duration::from_secs(60);
        periodically(shutdown, every(), every, || async {
            match tollgate.expire_credits().await {
                Ok(r) if r.grants > 0 => tracing::info!(grants = r.grants, lost = r.lost, "credit grants expired"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "closing expired credit grants failed; retried at the next pass"),
            }
            true
        })
        .await;
    }

    /// A reconciliation pass every `export.reconcile_interval` (none when it is zero: looked at
    /// again each minute, for a reload that turns it on), the first one interval after start:
    /// it acts on what it proves ([`Tollgate::reconcile`]).
    async fn reconciliations(tollgate: Tollgate, shutdown: watch::Receiver<bool>, enabled: bool) {
        // A sink that cannot be read back was said at build: nothing to compare, ever.
        if !tollgate.exporter().reads_back() || !enabled {
            return;
        }
        let interval = || tollgate.shared().runtime().load().config.export.reconcile_interval;
        let every = || interval().max(Duration::from_secs(60));
        periodically(shutdown, every(), every, || async {
            if interval().is_zero() {
                return true;
            }
            match tollgate.reconcile_pass().await {
                Ok(report) => tracing::info!(
                    compared = report.compared,
                    settling = report.settling,
                    lacking_units = report.lacking_units,
                    surplus_units = report.surplus_units,
                    resent = report.resent,
                    confirmed = report.confirmed,
                    requeued = report.requeued,
                    "reconciliation pass"
                ),
                // Read back, yet nothing came of it this time: the loop goes on.
                Err(e @ crate::engine::ReconcileError::Unreadable) => {
                    tracing::debug!(error = %e, "reconciliation read nothing back; tried again at the next pass");
                }
                Err(e) => tracing::warn!(error = %e, "reconciliation failed; retried at the next pass"),
            }
            true
        })
        .await;
    }

    async fn background(mut self) {
        let intervals = |t: &Tollgate| {
            // Read in place: the configuration (with its tenants) is not cloned per tick.
            let rt = t.shared().runtime().load();
            let sweep = (rt.config.limits.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let directory = (rt.config.limits.directory_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
            (rt.config.usage.flush_interval, sweep, directory)
        };
        let (flush_every, sweep_every, directory_every) = intervals(&self.tollgate);
        let mut next_flush = Instant::now() + flush_every;
        let mut next_sweep = Instant::now() + sweep_every;
        let mut next_directory = Instant::now() + directory_every;
        // The sweep runs beside the worker's other work (its leases go back in batches that
        // may take a while): one at a time.
        let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
        let mut sweep = |tollgate: &Tollgate| {
            if sweeping.as_ref().is_some_and(|s| !s.is_finished()) {
                return;
            }
            let tollgate = tollgate.clone();
            sweeping = Some(tokio::spawn(async move {
                tollgate.sweep().await;
            }));
        };
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                Some(job) = self.prefetch.recv() => self.tollgate.units().refill(job).await,
                _ = tokio::time::sleep_until(next_flush), if self.flushes => {
                    // A failed flush is logged by `flush` and retried at the next one.
                    let _ = self.tollgate.flush().await;
                    let (flush_every, _, _) = intervals(&self.tollgate);
                    next_flush = Instant::now() + flush_every;
                }
                _ = tokio::time::sleep_until(next_sweep) => {
                    sweep(&self.tollgate);
                    let (_, sweep_every, _) = intervals(&self.tollgate);
                    next_sweep = Instant::now() + sweep_every;
                }
                _ = tokio::time::sleep_until(next_directory) => {
                    self.tollgate.revalidate().await;
                    let (_, _, directory_every) = intervals(&self.tollgate);
                    next_directory = Instant::now() + directory_every;
                }
                _ = self.tollgate.shared().sweep_now().notified() => {
                    sweep(&self.tollgate);
                }
            }
        }
        // A sweep under way ends its returns (each bounded by the store's time limits).
        if let Some(sweeping) = sweeping {
            let _ = sweeping.await;
        }
    }
}

/// Runs `pass` `first` after start, then `every()` after each pass ended, until shutdown (which
/// stops a pass under way: shutdown does its own final work) or `pass` answers `false`.
async fn periodically<F, Fut>(
    mut shutdown: watch::Receiver<bool>,
    first: Duration,
    every: impl Fn() -> Duration,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut next = Instant::now() + first;
    loop {
        if *shutdown.borrow() {
            return;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep_until(next) => {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    go_on = pass() => if !go_on { return },
                }
                next = Instant::now() + every();
            }
        }
    }
}
