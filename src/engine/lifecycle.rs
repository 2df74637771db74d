//! The engine's life: evicting idle tenants, refilling leases in the background, reloading
//! the configuration, shutting down without losing usage.

use std::{fmt, sync::Arc, time::Duration};

use crate::engine::{ExportReport, FlushReport, Tollgate};
use crate::{config::Config, plan::Runtime, store::StoreError};

/// What [`Tollgate::shutdown`] drained, and what it could not do in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The final flush.
    pub flush: FlushReport,
    /// The final export.
    pub export: ExportReport,
    /// Whether every `Idempotency-Key` settlement begun reached the store in time.
    pub keys_settled: bool,
    /// Whether every lease was given back in time, and the give-backs of holds settled after
    /// their lease went back (state let go) ended in time (one the store refused is logged
    /// as a warning). A lease not given back stays leased until its period ends: a hard quota
    /// under-admits meanwhile.
    pub leases_returned: bool,
    /// Holds still open when their share of the budget (a quarter) ran out: settled as
    /// recorded so far, their other units given back before the leases were.
    pub holds_closed: usize,
    /// Whether the export ran to its end (not asked for, or not in time: `false`; a durable
    /// store's next export sends what is left).
    pub exported: bool,
}

/// [`Tollgate::shutdown`] could not hand everything to the store before
/// `usage.shutdown_timeout`: what was lost with this process.
#[derive(Debug)]
#[non_exhaustive]
pub struct ShutdownError {
    records: usize,
    units: u64,
    source: StoreError,
}

impl ShutdownError {
    /// Usage records (tenant, meter, window) not committed to the store.
    #[must_use]
    pub fn records(&self) -> usize {
        self.records
    }

    /// Units in them.
    #[must_use]
    pub fn units(&self) -> u64 {
        self.units
    }

    /// The last store error.
    #[must_use]
    pub fn store_error(&self) -> &StoreError {
        &self.source
    }
}

impl fmt::Display for ShutdownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shutdown could not finish: {} usage records ({} units) were not flushed: {}",
            self.records, self.units, self.source
        )
    }
}

impl std::error::Error for ShutdownError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl Tollgate {
    /// Evicts tenants idle for longer than `limits.idle_timeout`, then the least recently
    /// seen ones while more than `limits.max_tenants` are held. Their usage is flushed by the
    /// next flush and their leases are given back. Returns how many were evicted.
    pub async fn sweep(&self) -> usize {
        self.units().events().sweep();
        let rt = self.shared().runtime().load_full();
        let limits = &rt.config.limits;
        let cutoff = self.shared().clock().unix_secs() - limits.idle_timeout.as_secs() as i64;
        let mut seen = self.gate().table().last_seen();
        let (mut evict, mut keep): (Vec<_>, Vec<_>) = seen.drain(..).partition(|(t, _)| *t < cutoff);
        if keep.len() > limits.max_tenants {
            keep.sort_by_key(|(t, _)| *t);
            let extra = keep.len() - limits.max_tenants;
            evict.extend(keep.drain(..extra));
        }
        let states = self.gate().table().evict(evict.into_iter().map(|(_, id)| id));
        let n = states.len();
        if n > 0 {
            self.shared().totals().evictions.add(n as u64);
            self.shared().metrics().tenants.set(self.gate().table().len() as f64);
            tracing::debug!(evicted = n, "tenants evicted");
        }
        self.return_leases(states).await;
        n
    }

    /// Replaces the configuration of a running engine. Quota counters and recorded usage are
    /// kept (they live in the store and the usage pipeline); every tenant is resolved again
    /// under its new plan on its next request, with a fresh token bucket. A tenant keeps the
    /// version of its plan it was put on ([`PlanSpec::version`](crate::config::PlanSpec::version));
    /// a plan whose limits change without a new version moves all its tenants, and the log
    /// says so ([`Config::changed_without_version`]).
    ///
    /// # Errors
    /// When the engine runs the store its configuration names (opened by
    /// [`Builder::open`](crate::Builder::open)), a configuration that names another store
    /// (`[store]`) is refused, naming the file, line and key that changed; the running
    /// configuration and store stay. A store given in code is not the file's to change.
    pub async fn reload(&self, config: Config) -> Result<(), crate::config::ConfigError> {
        if self.shared().store_configured() {
            self.shared().runtime().load().config.check_same_store(&config)?;
        }
        for plan in config.changed_without_version(&self.shared().runtime().load().config) {
            tracing::warn!(%plan, version = plan.version(),
                "the plan's limits changed without a new version: every tenant on it moves to the new limits now \
                 (to keep them on theirs, give the plan a new `version` and keep this one under [plans.NAME.versions.N])");
        }
        let rt = Runtime::compile(config, self.shared().metrics(), self.shared().clock());
        self.gate().table().rates().set_cap(rt.config.limits.max_tenants);
        self.shared().stores().configure(&rt.config);
        self.units().leases().configure(&rt.config);
        self.shared().runtime().store(Arc::new(rt));
        // Every tenant gets a state of the new configuration; their buckets carry over. What
        // was unknown may be known now (a key or tenant declared in `[tenants]`): forgotten,
        // every credential marked changed first, so that a lookup read under the old
        // configuration does not remember it again.
        let states = self.gate().table().evict_all();
        self.gate().forget_unknown();
        self.return_leases(states).await;
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Stops the engine in the one order every door uses, within `usage.shutdown_timeout`:
    /// see [`shutdown_within`](Self::shutdown_within). Call it once the server has stopped
    /// taking requests.
    ///
    /// # Errors
    /// A [`ShutdownError`] saying how many records and units were not flushed (also logged);
    /// leases are still given back where the store takes them.
    pub async fn shutdown(&self) -> Result<ShutdownReport, ShutdownError> {
        let budget = self.shared().runtime().load().config.usage.shutdown_timeout;
        self.shutdown_within(budget, true).await
    }

    /// Stops the engine within `budget`, in one order, for every door:
    ///
    /// 1. **stop admitting**: a request that reaches the engine from now on is answered 503
    ///    with `Retry-After: 1` (its usage would come after the final flush), and the worker
    ///    stops;
    /// 2. **wait for open holds** (a quarter of the budget at most), then settle those still
    ///    open as recorded so far;
    /// 3. **settle open `Idempotency-Key`s**: the settlements already begun reach the store
    ///    (within two store timeouts), so a retry elsewhere is answered from them;
    /// 4. **flush** every usage record, retried while the store fails, until two thirds of
    ///    the budget;
    /// 5. **give every lease back** (and a fleet concurrency's places), within a sixth of it at
    ///    least, and wait for the units of holds settled after their lease went back (its
    ///    tenant let go: a plan change, a reload, an eviction) on their way to the store;
    /// 6. **export**, with `export`, in the time left (closed windows; every window, open ones
    ///    included, when the store does not outlive the process).
    ///
    /// [`shutdown`](Self::shutdown) runs it within `usage.shutdown_timeout`; Lambda's
    /// extension within its ~500 ms, without the export (the scheduled export sends what is
    /// stored). The report says what could not be done.
    ///
    /// # Errors
    /// A [`ShutdownError`] when usage was not flushed: how many records and units were lost
    /// with this process (also logged). The leases are still given back, and the export tried.
    pub async fn shutdown_within(&self, budget: Duration, export: bool) -> Result<ShutdownReport, ShutdownError> {
        let started = tokio::time::Instant::now();
        let deadline = started + budget;
        // 1. Stop admitting.
        self.shared().stopping().store(true, std::sync::atomic::Ordering::Relaxed);
        self.units().holds().stop();
        self.units().leases().stop();
        let _ = self.shared().shutdown().send(true);
        let rt = self.shared().runtime().load_full();
        let durable = self.shared().stores().given().usage.is_durable();
        let mut report = ShutdownReport::default();
        // 2. Wait for the open holds (their requests record what their work did, and their
        // bodies end, which begins the settlement of their keys), a quarter of the budget at
        // most; settle the rest as recorded so far, before the flush takes their usage and the
        // leases go back with their units.
        if !self.units().holds().drained(started + budget / 4).await {
            report.holds_closed = self.units().holds().close_all();
            tracing::warn!(holds = report.holds_closed, "shutdown: holds still open were settled as recorded so far");
        }
        // 3. Settle the keys of requests that ended.
        let settle_for = (rt.config.usage.store_timeout * 2).min(budget / 4);
        report.keys_settled = self.settlements_done(self.shared().started(), settle_for).await;
        if !report.keys_settled {
            tracing::error!("shutdown: some Idempotency-Key settlements did not reach the store in time");
        }
        // 4. Flush, retried while the store fails, leaving a third of the budget.
        let flush_until = started + budget * 2 / 3;
        let mut delay = Duration::from_millis(20);
        let flushed = loop {
            let attempt = async {
                match tokio::time::timeout_at(flush_until, self.flush()).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout(budget)),
                }
            };
            match attempt.await {
                Ok(flush) => {
                    report.flush.batches += flush.batches;
                    report.flush.records += flush.records;
                    report.flush.units += flush.units;
                    break Ok(());
                }
                Err(e) if tokio::time::Instant::now() + delay < flush_until => {
                    tracing::warn!(error = %e, "shutdown: the store failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => break Err(e),
            }
        };
        // 5. Give every lease back (and every place of a fleet concurrency): what is left of
        // the budget, at least a sixth of it.
        let leases_until = deadline.max(tokio::time::Instant::now() + budget / 6);
        // The tenants' states, and the retired ones still held (a request of theirs still
        // running) or whose lease the store did not take back at a flush.
        let mut live = Vec::new();
        self.gate().table().for_each(|s| live.push(s.clone()));
        live.extend(self.gate().table().retired().iter().cloned());
        report.leases_returned = matches!(tokio::time::timeout_at(leases_until, self.return_leases(live)).await, Ok(left) if left.is_empty());
        // Units of holds settled after their lease went back (state let go) are on their way
        // to the store in tasks of their own: waited for, or they would stay reserved until
        // their period ends once the process exits.
        report.leases_returned &= self.units().leases().late_done(leases_until).await;
        let _ = tokio::time::timeout_at(leases_until, self.gate().places().release_all()).await;
        if !report.leases_returned {
            tracing::error!(
                "shutdown: not every lease was given back in time (their units stay leased until the period ends)"
            );
        }
        // 6. Export in the time left.
        let mut unexported = None;
        if export && flushed.is_ok() {
            let mut delay = Duration::from_millis(20);
            loop {
                let attempt = async {
                    let export = self.export_pass(!durable).await?;
                    report.export = export;
                    if !durable && export.waiting > 0 {
                        // The store dies with the process: windows left waiting for their
                        // tenant's customer would be lost, so they are retried as a failure is.
                        return Err(StoreError::Backend(
                            format!(
                                "{} windows wait for their tenant's billing customer (the directory could not \
                                 be read for it, or does not hold it) and the usage store does not outlive the process",
                                export.waiting
                            )
                            .into(),
                        ));
                    }
                    Ok::<_, StoreError>(())
                };
                let attempt = async {
                    match tokio::time::timeout_at(deadline, attempt).await {
                        Ok(r) => r,
                        Err(_) => Err(StoreError::Timeout(budget)),
                    }
                };
                match attempt.await {
                    Ok(()) => {
                        report.exported = true;
                        break;
                    }
                    Err(e) if tokio::time::Instant::now() + delay < deadline => {
                        tracing::warn!(error = %e, "shutdown: the export failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => {
                        if durable {
                            tracing::error!(error = %e, "shutdown: the export did not end in time; the next one sends it");
                        } else {
                            // The usage store dies with the process: what was not exported is lost.
                            unexported = Some(e);
                        }
                        break;
                    }
                }
            }
        }
        match flushed.and(unexported.map_or(Ok(()), Err)) {
            Ok(()) => Ok(report),
            Err(source) => {
                let (records, units) = self.units().pipeline().lock().await.held();
                let err = ShutdownError { records, units, source };
                tracing::error!(records, units, error = %err.source, "shutdown: usage not flushed is lost");
                Err(err)
            }
        }
    }

    /// Lets every tenant go and gives its quota leases back to the store; their usage stays
    /// for the next flush. What a process about to stop does besides flushing (on Lambda,
    /// within the short shutdown phase, where the full [`shutdown`](Self::shutdown) with its
    /// export may not fit). It then waits, for two store timeouts at most, for the units of
    /// holds settled after their lease went back (state let go) on their way to the store;
    /// a caller with less time bounds it with a timeout of its own.
    pub async fn release_leases(&self) {
        let states = self.gate().table().evict_all();
        self.return_leases(states).await;
        // And the units of holds settled after their lease went back, on their way to the
        // store (each call within the store timeout).
        let until = tokio::time::Instant::now() + self.store_timeout() * 2;
        self.units().leases().late_done(until).await;
    }

    /// Settles what this process owes before a snapshot of its memory (AWS Lambda SnapStart)
    /// is taken: every tenant is let go and its quota leases are given back, then every usage
    /// record is flushed. Copies restored from the snapshot then carry no lease to spend twice
    /// and no usage to flush twice. Call [`after_restore`](Self::after_restore) in each copy.
    ///
    /// # Errors
    /// The store's error when the flush failed: the snapshot must not be taken then (each copy
    /// would flush the same usage again), so the runtime's hook reports it and stops. Also an
    /// error when units of a hold settled after its lease went back (state let go) are still
    /// on their way to the store two store timeouts after the leases went back (each copy
    /// would give them back again).
    pub async fn before_snapshot(&self) -> Result<FlushReport, StoreError> {
        // Holds open now would be open in every copy: settled as recorded so far, their units
        // back in the leases that go back next.
        self.units().holds().close_all();
        self.release_leases().await;
        // A give-back still on its way would be on its way in every copy (each giving the
        // same units back): the snapshot waits for none.
        if !self.units().leases().late_done(tokio::time::Instant::now()).await {
            return Err(StoreError::Backend("units of a hold are still on their way back to the store".into()));
        }
        // Places of fleet concurrencies held now would be held by every copy (each admitting
        // on them): given back, spares too.
        self.gate().places().release_all().await;
        // Nothing held back: every copy would flush it again.
        let report = self.flush_as(true).await?;
        let (records, _) = self.units().pipeline().lock().await.held();
        if records > 0 {
            return Err(StoreError::Backend(format!("{records} usage records are still unflushed").into()));
        }
        Ok(report)
    }

    /// Makes a process restored from a snapshot its own: draws a new node id (for flush ids,
    /// quota calls, idempotency and export claims) and new credential secrets from the
    /// operating system, forgets what the old secrets keyed (tenants, unknown credentials),
    /// and reads the wall clock again. Copies of one snapshot then never share a flush id or
    /// a lease.
    pub async fn after_restore(&self) {
        self.shared().ids().renew();
        self.units().pipeline().lock().await.renew_node();
        // New credential secrets, every tenant let go first with the secrets that keyed its
        // credentials. Normally none is left (`before_snapshot` let every tenant go, and
        // nothing ran since). What is left was in the snapshot, so it is in every copy: none
        // may give its leases back or flush its usage (each would). It is forgotten: its
        // leases under-admit until their period ends rather than over-admit, its usage is not
        // billed rather than billed once per copy.
        drop(self.gate().table().reseed());
        let left = std::mem::take(&mut *self.gate().table().retired());
        let mut units = 0u64;
        for state in &left {
            for cell in state.quotas() {
                cell.take_all();
                cell.forget_unleased();
            }
            state.drain_usage(|_, _, q| units = units.saturating_add(q));
        }
        if !left.is_empty() {
            tracing::warn!(tenants = left.len(), units, "restored: tenant state left in the snapshot was forgotten");
        }
        // Jobs' reservations in the snapshot are in every copy: forgotten, their units spent
        // (each copy giving them back would over-admit).
        self.units().events().forget_reserved();
        // Places still held in the snapshot are in every copy, with the senders drawn before
        // it: forgotten (they expire in the store), and leased anew under this copy's own.
        self.gate().places().forget();
        self.gate().forget_unknown();
        self.shared().clock().resync();
        tracing::info!("restored from a snapshot: new node id and secrets");
    }
}
