//! The engine's facade ([`Tollgate`]): one per application, behind every front door. It holds
//! the engine's parts (admission, usage, export, alerts) and what they share, delegates to them,
//! and keeps the flows that cross parts (a flush, which also writes alerts; the statistics).

use std::{fmt, sync::Arc, time::Duration};

use crate::engine::{
    admit::{
        gate::Gate,
        stage::{Admission, PendingAdmission, RequestInfo},
        ticket::Ticket,
    },
    alerts::{AlertReport, Alerts},
    export::exporter::{ExportReport, Exporter},
    export::reconcile::{ReconcileError, ReconcileReport, ReconcileRequest},
    recharge::Recharges,
    shared::Shared,
    usage::{credits::CreditExpiryReport, flush::FlushReport, units::Units},
};
use crate::{
    billing::MeterEvent,
    clock::Clock,
    metrics::Stats,
    response::Rejection,
    store::{DirectoryStore, IdempotencyStore, QuotaStore, StoreError, UsageExportStore},
    tenant::Tenant,
};

/// The engine: tenants, plans, counters and the usage pipeline, shared by every front door
/// and every clone of them. A cheap `Clone` handle.
///
/// Build it with [`Tollgate::builder`]. Front doors call [`admit`](Self::admit) per request;
/// operations call [`flush`](Self::flush), [`shutdown`](Self::shutdown) and
/// [`reload`](Self::reload).
#[derive(Clone)]
pub struct Tollgate {
    engine: Arc<Engine>,
}

/// The engine's parts, each owning its state behind its verbs, and what they share.
pub(crate) struct Engine {
    pub(crate) shared: Arc<Shared>,
    /// Admission: the tenant table, keys, places; the verbs that decide on a request.
    pub(crate) gate: Gate,
    /// Usage: leases, the pipeline, events, holds, credit expiry, prefetch.
    pub(crate) units: Arc<Units>,
    /// The billing export.
    pub(crate) exporter: Exporter,
    /// The alerts outbox's writes and deliveries.
    pub(crate) alerts: Alerts,
    /// Auto-recharge: the claims this node's refills made, waiting for the worker, and what
    /// charges them (the usage part's leases are handed it, to queue their claims).
    pub(crate) recharges: Arc<Recharges>,
}

impl fmt::Debug for Tollgate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tollgate")
            .field("tenants", &self.engine.gate.table().len())
            .field("stores", self.engine.shared.stores())
            .finish_non_exhaustive()
    }
}

impl Tollgate {
    /// The engine made of its parts (the builder's).
    pub(crate) fn from_parts(engine: Engine) -> Self {
        Self { engine: Arc::new(engine) }
    }

    /// What every part shares.
    #[inline]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.engine.shared
    }

    /// The admission part.
    #[inline]
    pub(crate) fn gate(&self) -> &Gate {
        &self.engine.gate
    }

    /// The usage part.
    #[inline]
    pub(crate) fn units(&self) -> &Arc<Units> {
        &self.engine.units
    }

    /// The export part.
    #[inline]
    pub(crate) fn exporter(&self) -> &Exporter {
        &self.engine.exporter
    }

    /// The alerts part.
    #[inline]
    pub(crate) fn alerts(&self) -> &Alerts {
        &self.engine.alerts
    }

    /// The recharge part.
    #[inline]
    pub(crate) fn recharges(&self) -> &Arc<Recharges> {
        &self.engine.recharges
    }
}

impl Tollgate {
    /// Decides on a request without waiting. Most requests of known tenants are decided here;
    /// the rest come back as [`Admission::Pending`].
    #[inline]
    pub fn admit(&self, req: &RequestInfo<'_>) -> Admission {
        self.admit_with(|_| *req)
    }

    /// Like [`admit`](Self::admit), for front doors that need the configured way of
    /// identifying tenants to describe the request: [`FrontDoor::admit_with`](crate::door::FrontDoor::admit_with) on a door made
    /// for this one request (a door kept per service saves that). An `Idempotency-Key` on a
    /// method the configuration does not list (`limits.idempotency_methods`) is ignored.
    pub fn admit_with<'a>(&self, describe: impl FnOnce(&crate::config::Identify) -> RequestInfo<'a>) -> Admission {
        self.front_door().admit_with(describe)
    }

    /// Stops spending every lease whose reservation this node could not renew in time
    /// (`limits.reservation_expiry` less [`Limits::clock_skew`](crate::config::Limits::clock_skew)
    /// since the call that last renewed it): its units wait until a call renews it, or finds
    /// that the store gave them back. Each flush does it first; a process that was frozen (a
    /// Lambda environment between invocations) calls it before it serves again, so that it
    /// never spends units the store may have given to the fleet meanwhile. Returns the leases
    /// stopped.
    ///
    /// It visits the tenants only once the earliest renewal of a resident lease may have
    /// lapsed: until then it returns at once, whatever the number of tenants.
    #[must_use = "the leases stopped, for a log"]
    pub fn stop_stale_leases(&self) -> usize {
        let now = self.clock().unix_secs();
        let leases = self.units().leases();
        let (expiry, skew) = leases.expiry();
        let mut stopped = 0;
        leases.renewals().pass(now, expiry - skew, || {
            let mut earliest = i64::MAX;
            self.gate().table().for_each(|s| {
                for cell in s.quotas() {
                    let at = cell.reported_at();
                    if at > 0 {
                        earliest = earliest.min(at);
                    }
                    if cell.stale(now, expiry, skew) && cell.stash() > 0 {
                        stopped += 1;
                    }
                }
            });
            earliest
        });
        stopped
    }

    /// Commits all usage recorded so far to the store, exactly once: a batch that fails is
    /// kept and retried first, with the same id, by the next flush. Usage is drained from the
    /// tenants' counters even when the store is down (held in memory, merged per tenant,
    /// meter and window, up to a bound), so an outage longer than a window keeps every
    /// window's usage in its own window.
    ///
    /// It also writes the alerts this node saw (threshold crossings, `[alerts]`) to the
    /// outbox; one that cannot be written is written when a refill sees it again.
    ///
    /// # Errors
    /// The store error that stopped the flush; nothing is lost.
    pub async fn flush(&self) -> Result<FlushReport, StoreError> {
        // Stopping, values of open dimensions still unclaimed are billed under `other`.
        let last = self.shared().stopping().load(std::sync::atomic::Ordering::Relaxed);
        self.flush_as(last).await
    }

    /// [`flush`](Self::flush); `last`: no usage is held back for a later flush (values of open
    /// dimensions still unclaimed are billed under `"other"`).
    pub(crate) async fn flush_as(&self, last: bool) -> Result<FlushReport, StoreError> {
        let units = self.units();
        let flushed = units.pipeline().flush(self.shared().runtime(), self.gate().table(), units.leases(), last).await;
        self.alerts().write().await;
        flushed
    }

    /// Finishes a pending admission: asks the store, within `usage.store_timeout`, under the
    /// configuration it was decided under.
    ///
    /// # Errors
    /// The rejection to answer the request with.
    pub async fn resolve(&self, pending: PendingAdmission) -> Result<Ticket, Rejection> {
        // Feature `otel`: resolved under its admission's span (its store calls its children),
        // which its decision ends.
        #[cfg(feature = "otel")]
        let pending = {
            let mut pending = pending;
            if let Some(span) = pending.trace.take() {
                use opentelemetry::context::FutureExt as _;
                let resolved = self.gate().resolve(pending).with_context(span.context().clone()).await;
                match &resolved {
                    Ok(pass) => pass.trace(*span),
                    Err(r) => r.trace(*span),
                }
                return Ok(Ticket::new(resolved?, self.units().clone()));
            }
            pending
        };
        let pass = self.gate().resolve(pending).await?;
        Ok(Ticket::new(pass, self.units().clone()))
    }

    /// Sends the usage of closed windows to the billing sink, exactly once per (tenant, meter,
    /// window, revision). A window is closed once it ended (for a pre-aggregated meter, the
    /// billing meter's hour or day) and `usage.grace` passed. Does nothing without a sink.
    ///
    /// Runs apart from [`flush`](Self::flush) (never under its lock); the worker calls it
    /// every `export.interval`, and a scheduled job may call it too (`tollgate export`).
    ///
    /// # Errors
    /// A store error; what was sent before it stays marked.
    pub async fn export(&self) -> Result<ExportReport, StoreError> {
        self.export_pass(false).await
    }

    /// Compares what the billing system holds with the store's ledger of what it accepted,
    /// hour by hour, for each (customer, meter) with events stamped in the request's range or
    /// open dead letters that may have been taken; with [`ReconcileRequest::fix`], acts on
    /// what it proves:
    ///
    /// - an hour the billing system lacks (all of its events, or one whose value is the
    ///   shortfall), found so by two passes at least `export.reconcile_after` apart and past
    ///   the billing system's de-duplication horizon (24 hours after export): its value is
    ///   put back in line as a new revision, which the next export sends under a new
    ///   identifier, once;
    /// - an hour it holds more of: reported (`tollgate_billing_drift_units{direction="surplus"}`),
    ///   never corrected by negative values;
    /// - an `unconfirmed`, `unsettled` or status-less dead letter: confirmed when the billing
    ///   system holds its value on top of the ledger's, requeued when two passes apart found it
    ///   lacking.
    ///
    /// Hours with an event exported less than `export.reconcile_after` ago are settling and
    /// not compared; meters that are not sums are not compared. Reads are paced with the
    /// export's calls (`export.calls_per_second`). The worker runs it every
    /// `export.reconcile_interval`, with `fix`, over the window described in the
    /// [Stripe guide](crate::guide::stripe).
    ///
    /// # Errors
    /// No sink or one that cannot be read back ([`ReconcileError::Unreadable`]), the store, or
    /// the billing system failed.
    pub async fn reconcile(&self, request: &ReconcileRequest) -> Result<ReconcileReport, ReconcileError> {
        self.exporter().reconcile(&self.shared().runtime().load_full(), request).await
    }

    /// The worker's reconciliation pass: with `fix`, over the hours that reach every event
    /// from `export.reconcile_after` after its export until past the billing system's
    /// de-duplication horizon ([`worker_reach`](crate::engine::export::reconcile::worker_reach)); sets the drift gauges.
    pub(crate) async fn reconcile_pass(&self) -> Result<ReconcileReport, ReconcileError> {
        let rt = self.shared().runtime().load_full();
        let now = self.shared().clock().unix_secs();
        let from = now - crate::engine::export::reconcile::worker_reach(&rt);
        let report = self.reconcile(&ReconcileRequest::new(from, now).fix(true)).await?;
        self.exporter().record_drift(&report);
        Ok(report)
    }

    /// What the next [`export`](Self::export) would send, without sending or claiming
    /// anything: an export already in flight with its fixed parameters, the others as they
    /// would be fixed now. Windows of tenants that are not billable are left out.
    ///
    /// # Errors
    /// A store error.
    pub async fn export_preview(&self) -> Result<Vec<MeterEvent>, StoreError> {
        self.exporter().preview(&self.shared().runtime().load_full()).await
    }

    /// [`export`](Self::export); with `all`, windows still open count as closed (the final
    /// export of a store that does not outlive the process), with timestamps no later than
    /// now.
    pub(crate) async fn export_pass(&self, all: bool) -> Result<ExportReport, StoreError> {
        // Feature `otel`: the pass is a span, its store and billing system calls its children.
        #[cfg(feature = "otel")]
        {
            use opentelemetry::context::FutureExt as _;
            let cx = crate::base::trace::pass_context("tollgate export");
            let result = self.exporter().export_pass(self.shared().runtime(), all).with_context(cx.clone()).await;
            crate::base::trace::end_pass(&cx, result.as_ref().err().map(|_| "store"));
            result
        }
        #[cfg(not(feature = "otel"))]
        self.exporter().export_pass(self.shared().runtime(), all).await
    }

    /// Gives the unused units of these states' current leases back to the store, and owes
    /// what they used beyond them: the states with a lease the store did not take.
    pub(crate) async fn return_leases(&self, states: Vec<Tenant>) -> Vec<Tenant> {
        self.units().leases().return_leases(states).await
    }

    /// Closes the credit grants expired by the engine's clock, each once across a fleet (a
    /// grant another node closed first is passed over): each loses the units it still held,
    /// units leased to nodes counting as spent. The worker runs it every minute; at most
    /// 1,000 grants a pass. A grant whose close fails (a busy balance, a timeout) waits on
    /// this node (two minutes, doubling up to an hour) while the pass goes on to the others;
    /// one that fails again never stops a pass.
    ///
    /// # Errors
    /// A store error (or timeout) on several closes in a row, or on the listing: the grants
    /// not closed are closed by a later pass.
    pub async fn expire_credits(&self) -> Result<CreditExpiryReport, StoreError> {
        self.units().expire_credits().await
    }

    /// Delivers the alerts due in the outbox, claiming them a batch at a time for
    /// `alerts.claim` (no other node delivers them meanwhile), for at most half a claim: the
    /// worker does it every second; a scheduled job may call it too.
    pub async fn deliver_alerts(&self) -> AlertReport {
        let half = self.shared().runtime().load().config.alerts().claim / 2;
        self.deliver_alerts_within(half).await
    }

    /// [`deliver_alerts`](Self::deliver_alerts) within `budget`: no delivery starts that could
    /// not end within it (or within its claim), and each attempt's time limit is the least of
    /// `alerts.timeout` and the time left; a delivery not started keeps its place (its claim
    /// is given back). On AWS Lambda's on-demand model, `tollgate_lambda` calls it after
    /// invocations, where no worker runs between them.
    pub async fn deliver_alerts_within(&self, budget: Duration) -> AlertReport {
        self.alerts().deliver_within(budget).await
    }

    /// Waits, at most `limit`, for the places given back in the background (after requests'
    /// bodies went) to reach the store, and the node's one spare marked so in it: `true` when
    /// none is left. A front door whose process is frozen after each response (Lambda
    /// on-demand) awaits them before it returns, so that the other nodes get the places at
    /// once (a marked spare is another node's to take before it is refused).
    pub async fn places_released(&self, limit: Duration) -> bool {
        self.gate().places().released(limit).await
    }

    /// Waits, at most `limit`, for this node's `Idempotency-Key` settlements that began at or
    /// after `since` (each completed or failed keyed request's, made in the background after
    /// its response) to reach the store: `true` when none of them is left. A front door whose
    /// process is frozen after each response (Lambda on-demand) awaits those of the invocation
    /// (`since` its start) before it returns, or the others in the fleet would answer 409 to
    /// the key's retries until its claim expires (and then run them again, billed again).
    /// Usually `usage.store_timeout` is enough. Settlements begun earlier (retrying after a
    /// store hiccup) are not waited for.
    pub async fn settlements_done(&self, since: std::time::Instant, limit: Duration) -> bool {
        self.gate().idempotency().all_settled(since, limit).await
    }

    /// `usage.store_timeout` of the configuration in force: how long one store call may take.
    #[must_use]
    pub fn store_timeout(&self) -> Duration {
        self.shared().runtime().load().config.usage.store_timeout
    }

    /// `usage.flush_interval` of the configuration in force: how often usage should reach the
    /// store (the worker's pace; a front door that flushes itself, as on Lambda, follows it).
    #[must_use]
    pub fn flush_interval(&self) -> Duration {
        self.shared().runtime().load().config.usage.flush_interval
    }

    /// This engine's node id (drawn anew by [`after_restore`](Self::after_restore)), for tests
    /// (feature `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    #[must_use]
    pub fn node_id(&self) -> u64 {
        self.shared().ids().node()
    }

    /// Counters of the background paths, and the number of tenants held.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let table = self.gate().table();
        let mut stats = self.shared().totals().snapshot(table.len());
        stats.held_rate_states = table.rates().len() as u64;
        stats.open_values = self.shared().metrics().open_values.load(std::sync::atomic::Ordering::Relaxed) as u64;
        stats.rate_states_dropped = table.rates().dropped();
        let responses = self.gate().idempotency().responses();
        stats.responses_stored = responses.stored.load(std::sync::atomic::Ordering::Relaxed);
        stats.responses_not_stored = responses.not_stored_total();
        stats.response_bytes_buffered = responses.buffered.load(std::sync::atomic::Ordering::Relaxed);
        // Jobs' holds whose hold ended are counted gone.
        self.units().events().sweep();
        let holds = self.units().holds();
        stats.holds_open = holds.len() as u64;
        stats.units_held = holds.units();
        stats.holds_expired = holds.expired.load(std::sync::atomic::Ordering::Relaxed);
        stats.records_after_settle = holds.records_after_settle.load(std::sync::atomic::Ordering::Relaxed);
        stats.holds_refused_full = holds.refused_full.load(std::sync::atomic::Ordering::Relaxed);
        stats.hold_overruns = holds.overruns.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(clients) = self.shared().runtime().load().anonymous.as_ref().and_then(|p| p.clients.as_ref()) {
            clients.cells.settle();
            stats.tracked_clients = clients.cells.len();
        }
        stats
    }

    /// `tenant`'s refusals among the last ones of identified tenants on this node, by kind,
    /// with the time of the oldest kept (the operator dashboard's).
    #[cfg(feature = "dashboard")]
    pub(crate) fn recent_rejections(
        &self,
        tenant: &crate::base::TenantId,
    ) -> (Vec<(crate::base::RejectionKind, u64)>, Option<i64>) {
        self.gate().recent().of(tenant)
    }

    /// How many of the last refusals of identified tenants a node keeps
    /// ([`recent_rejections`](Self::recent_rejections)).
    #[cfg(feature = "dashboard")]
    pub(crate) const RECENT_REJECTIONS: usize = crate::engine::admit::recent::RECENT_REJECTIONS;

    /// The clock the engine reads.
    #[must_use]
    pub fn clock(&self) -> &Clock {
        self.shared().clock()
    }

    /// The store of the quota role: leases are reserved from it.
    #[must_use]
    pub fn quota_store(&self) -> &Arc<dyn QuotaStore> {
        &self.shared().stores().given().quota
    }

    /// The store of the usage and export roles: usage is flushed to it and exported from it.
    #[must_use]
    pub fn usage_store(&self) -> &Arc<dyn UsageExportStore> {
        &self.shared().stores().given().usage
    }

    /// The store of the directory role: tenants and keys are looked up in it.
    #[must_use]
    pub fn directory_store(&self) -> &Arc<dyn DirectoryStore> {
        &self.shared().stores().given().directory
    }

    /// The store of the idempotency role: `Idempotency-Key` bindings are claimed in it.
    #[must_use]
    pub fn idempotency_store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.shared().stores().given().idempotency
    }

    /// The dashboard's token in force (`[dashboard] token_file`), read without copying the
    /// configuration.
    #[cfg(feature = "dashboard")]
    pub(crate) fn dashboard_token(&self) -> Option<crate::config::DashboardToken> {
        self.shared().runtime().load().config.dashboard().token.clone()
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> crate::config::Config {
        self.shared().runtime().load().config.clone()
    }
}
